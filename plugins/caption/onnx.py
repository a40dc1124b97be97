"""ONNX export of the captioner (ViT encoder + GPT-2 decoder with cross-attention) and its onnxruntime runner.

Graphs: ``encoder.onnx``: ``pixel_values`` (batch, 3, S, S) -> ``encoder_hidden_states`` and the decoder's
cross-attention ``cross.{i}.key/value`` (batch, heads, patches+1, head_dim), computed once per image;
``decoder.onnx``: ``input_ids``, ``past_key_values.{i}.key/value`` and ``cross.{i}.key/value`` -> ``logits`` and
``present.{i}.key/value``. ``OnnxCaptionRunner`` offers the runner interface of plugins/caption/decode.py.
torch is imported inside the export functions only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from engine.backends.common import max_abs

log = logging.getLogger(__name__)

ENCODER_TOLERANCE = 1e-3
N_GREEDY_PARITY = 8  # renders captioned greedily by both backends at export
N_QUALITY = 100  # renders for the int8 exact-match rate


# ----- runtime (no torch) ------------------------------------------------------------------------
class OnnxCaptionRunner:
    """``encode(pixel_values) -> state``, ``start(state, batch) -> past``, ``step(ids, past) -> (logits, past)``,
    ``reorder(past, index) -> past`` on onnxruntime sessions."""

    def __init__(self, encoder_session, decoder):
        self.encoder = encoder_session
        self.decoder = decoder
        self.cross_names = [o.name for o in encoder_session.get_outputs() if o.name.startswith("cross.")]

    def encode(self, pixel_values):
        x = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        out = self.encoder.run(self.cross_names, {"pixel_values": x})
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(out) // 2)]

    def start(self, state, batch: int = 1):
        cross = [(np.repeat(k, batch, axis=0) if k.shape[0] != batch else k,
                  np.repeat(v, batch, axis=0) if v.shape[0] != batch else v) for k, v in state]
        return self.decoder.new_cache(batch, cross)

    def step(self, ids, past):
        return self.decoder.step(ids, past)

    def reorder(self, past, index):
        past.reorder(index)
        return past


def light_config(cfg: dict) -> SimpleNamespace:
    """The few config facts the caption pipeline needs, from the manifest (no torch, no model classes)."""
    return SimpleNamespace(decoder_start_token_id=cfg["decoder_start_token_id"], eos_token_id=cfg["eos_token_id"],
                           pad_token_id=cfg.get("pad_token_id"),
                           decoder=SimpleNamespace(n_positions=cfg["max_positions"], vocab_size=cfg["vocab_size"]),
                           encoder=SimpleNamespace(image_size=cfg["image_size"]))


def load_caption(model_folder, model_hash=None, threads=None, export_dir=None, export=None):
    """(OnnxCaptionRunner, light config) for a caption model folder's preferred export, or for ``export_dir``."""
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import Export, open_export

    export = Export(Path(export_dir), threads) if export_dir else open_export(Path(model_folder), model_hash, threads,
                                                                              export)
    cfg = export.manifest["config"]
    runner = OnnxCaptionRunner(export.session("encoder"), OnnxDecoder(export.session("decoder"), cfg))
    return runner, light_config(cfg)


# ----- export (torch) ----------------------------------------------------------------------------
def encoder_wrapper(model):
    import torch

    class EncoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            h = self.model.encode(pixel_values)
            out = [h]
            for k, v in self.model.decoder.cross_kv(h):
                out += [k, v]
            return tuple(out)

    return EncoderGraph().eval()


def render_set(n: int, size: int, seed: int):
    """``n`` fixed scenes rendered (plain and anti-aliased alternately) -> (list of PIL images, captions)."""
    from PIL import Image

    from engine.shapes import caption, render, sample_scene

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        scene = sample_scene(rng)
        images.append(Image.fromarray(render(scene, 32, antialias=bool(i % 2))))
        captions.append(caption(scene))
    return images, captions


def greedy_ids(runner, pixels, cfg: dict, max_new: int = 24) -> list:
    from plugins.caption.decode import greedy

    return greedy(runner, pixels, cfg["decoder_start_token_id"], cfg["eos_token_id"],
                  min(max_new, cfg["max_positions"])).tokens


def exact_match(runner, tokenizer, pixels: list, captions: list, cfg: dict) -> float:
    eos = cfg["eos_token_id"]
    hits = 0
    for px, want in zip(pixels, captions):
        ids = [t for t in greedy_ids(runner, px, cfg) if t != eos]
        hits += tokenizer.decode(ids, skip_special_tokens=True).strip() == want
    return hits / max(1, len(captions))


def export_caption(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the vision-encoder-decoder family (see engine.onnx_export for the contract)."""
    import torch

    from plugins.caption.model import TorchCaptionRunner, load_caption_model
    from plugins.caption.pipeline import Preprocess
    from engine.backends.common import (describe_graphs, export_graph, kv_names, quantize_graphs, relative_gate,
                                        replace_graphs)
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_session
    from engine.backends.decoders import QUANT_PROMPTS, decoder_parity, export_decoder, quantized_parity, torch_stepper

    say = options.get("log") or (lambda m: None)
    torch.manual_seed(0)
    folder = Path(model_ref.path)
    model = load_caption_model(folder, device="cpu", dtype=torch.float32)
    mc = model.config
    dec = mc.decoder
    S = mc.encoder.image_size
    cfg = {"family": model_ref.family, "n_layers": dec.n_layer, "n_kv_heads": dec.n_head,
           "head_dim": dec.n_embd // dec.n_head, "vocab_size": dec.vocab_size, "max_positions": dec.n_positions,
           "decoder_start_token_id": mc.decoder_start_token_id, "eos_token_id": mc.eos_token_id,
           "pad_token_id": mc.pad_token_id, "image_size": S}
    out_dir = Path(out_dir)
    enc_path, dec_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    say(f"exporting the image encoder ({S}x{S}) and the text decoder ({dec.n_layer} layers) to ONNX")
    L = dec.n_layer
    example = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    enc_outs = ["encoder_hidden_states"] + kv_names(L, "cross")
    dyn = {"pixel_values": {0: "batch"}}
    dyn.update({n: {0: "batch"} for n in enc_outs})
    export_graph(encoder_wrapper(model), (example,), enc_path, ["pixel_values"], enc_outs, dyn)
    n_tokens = getattr(mc.encoder, "num_tokens", None) or mc.encoder.num_patches + 1
    export_decoder(model.decoder, cfg, dec_path, cross_shape=(dec.n_head, n_tokens or 2, dec.n_embd // dec.n_head))

    def check(enc_file, dec_file):
        enc_sess = open_session(enc_file)
        runner = OnnxCaptionRunner(enc_sess, OnnxDecoder(open_session(dec_file), cfg))
        return enc_sess, runner

    enc_sess, runner = check(enc_path, dec_path)
    say("checking parity with PyTorch")
    g = np.random.default_rng(0)
    px = g.standard_normal((2, 3, S, S)).astype(np.float32)
    with torch.inference_mode():
        t_out = encoder_wrapper(model)(torch.from_numpy(px))
    o_out = enc_sess.run(enc_outs, {"pixel_values": px})
    enc_diff = max(max_abs(t.numpy(), o) for t, o in zip(t_out, o_out))
    t_cache = model.decoder.new_cache()
    t_cache.cross = [(t_out[1 + 2 * i], t_out[2 + 2 * i]) for i in range(L)]
    o_cache = runner.decoder.new_cache(2, [(o_out[1 + 2 * i], o_out[2 + 2 * i]) for i in range(L)])
    parity = {"encoder": {"max_abs_diff": float(f"{enc_diff:.3g}"), "tolerance": ENCODER_TOLERANCE,
                          "passed": bool(enc_diff <= ENCODER_TOLERANCE), "inputs": f"2 random images {S}x{S}"},
              "decoder_logits": decoder_parity(torch_stepper(model.decoder), runner.decoder, dec.vocab_size,
                                               t_cache, o_cache)}
    pre = Preprocess.from_folder(folder, S)
    images, captions = render_set(N_GREEDY_PARITY, S, seed=7)
    torch_runner = TorchCaptionRunner(model)
    differ = sum(greedy_ids(torch_runner, pre(im), cfg) != greedy_ids(runner, pre(im), cfg) for im in images)
    parity["greedy_captions"] = {"max_abs_diff": float(differ), "tolerance": 0.0, "passed": differ == 0,
                                 "identical": f"{N_GREEDY_PARITY - differ}/{N_GREEDY_PARITY}",
                                 "inputs": f"{N_GREEDY_PARITY} rendered scenes, greedy decoding"}
    layout = export_optimum_layout(model, folder, out_dir, S, say)
    o_runner = layout.pop("runner")
    parity["optimum_encoder"] = layout
    differ = sum(greedy_ids(torch_runner, pre(im), cfg) != greedy_ids(o_runner, pre(im), cfg) for im in images)
    parity["optimum_greedy_captions"] = {"max_abs_diff": float(differ), "tolerance": 0.0, "passed": differ == 0,
                                         "identical": f"{N_GREEDY_PARITY - differ}/{N_GREEDY_PARITY}",
                                         "inputs": f"{N_GREEDY_PARITY} rendered scenes, greedy decoding over "
                                                   "encoder_model + decoder_model + decoder_with_past_model"}
    del o_runner
    options.get("gate", lambda p: None)(parity)
    graphs, opset = describe_graphs({"encoder": enc_path, "decoder": dec_path,
                                     **{f[:-5]: out_dir / f for f in OPTIMUM_FILES}})
    result = {"graphs": graphs, "parity": parity, "config": cfg, "opset": opset}
    scheme = options.get("quantize")
    if scheme:
        say(f"quantizing the weights to {scheme}, gating them against fp32 and measuring exact match on "
            f"{N_QUALITY} renders")
        q_enc, q_dec = quantize_graphs({"encoder": enc_path, "decoder": dec_path}, scheme).values()
        _, q_runner = check(q_enc, q_dec)
        from plugins.caption.tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
        images, captions = render_set(N_QUALITY, S, seed=1234)
        pixels = [pre(im) for im in images]
        batch = np.concatenate([np.asarray(p, dtype=np.float32).reshape(1, 3, S, S) for p in pixels[:QUANT_PROMPTS]])

        def from_images(r):  # the decoder, started from its own encoder's states of fixed renders
            state = r.encode(batch)
            return lambda ids, c: r.decoder(ids, c if c is not None else r.start(state, QUANT_PROMPTS))

        kv = [pair for ref, got in zip(runner.encode(batch), q_runner.encode(batch)) for pair in zip(ref, got)]
        gate = {f"encoder_{scheme}": relative_gate(kv, scheme, f"cross-attention keys and values of {QUANT_PROMPTS} "
                                                               "fixed renders"),
                f"decoder_logits_{scheme}": quantized_parity(from_images(runner), from_images(q_runner),
                                                             dec.vocab_size, scheme)}
        gate[f"decoder_logits_{scheme}"]["against"] = "the fp32 ONNX encoder and decoder, on fixed renders"
        options.get("gate", lambda p: None)(gate)
        parity.update(gate)
        quality = {"renders": f"{N_QUALITY} fixed scenes (seed 1234), plain and anti-aliased alternately",
                   "exact_match_torch_fp32": round(exact_match(torch_runner, tok, pixels, captions, cfg), 4),
                   "exact_match_onnx_fp32": round(exact_match(runner, tok, pixels, captions, cfg), 4),
                   f"exact_match_onnx_{scheme}": round(exact_match(q_runner, tok, pixels, captions, cfg), 4)}
        quality[f"exact_match_cost_{scheme}"] = round(quality["exact_match_onnx_fp32"]
                                                      - quality[f"exact_match_onnx_{scheme}"], 4)
        same = sum(greedy_ids(runner, p, cfg) == greedy_ids(q_runner, p, cfg) for p in pixels[:20])
        quality[f"{scheme}_captions_identical_to_fp32"] = f"{same}/20"
        del runner, q_runner, enc_sess
        replace_graphs(((q_enc, enc_path), (q_dec, dec_path)))
        result["quantization"] = {"quality": quality}
    return result


# ----- the layout Optimum's ORTModelForVision2Seq opens ------------------------------------------------------
OPTIMUM_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt")


def optimum_kv_names(n_layers: int, prefix: str, parts=("decoder", "encoder")) -> list:
    return [f"{prefix}.{i}.{part}.{t}" for i in range(n_layers) for part in parts for t in ("key", "value")]


class OptimumLayoutRunner:
    """The runner interface of plugins/caption/decode.py over the three Optimum graphs: ``encoder_model``
    (pixel_values -> last_hidden_state), ``decoder_model`` (first step: input_ids + encoder_hidden_states -> logits,
    self- and cross-attention presents) and ``decoder_with_past_model`` (later steps)."""

    def __init__(self, encoder, decoder, decoder_with_past, n_layers: int):
        self.encoder, self.decoder, self.with_past, self.L = encoder, decoder, decoder_with_past, n_layers
        self.first_outs = ["logits"] + optimum_kv_names(n_layers, "present")
        self.past_names = optimum_kv_names(n_layers, "past_key_values")
        self.next_outs = ["logits"] + optimum_kv_names(n_layers, "present", ("decoder",))

    def encode(self, pixel_values):
        x = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        return self.encoder.run(["last_hidden_state"], {"pixel_values": x})[0]

    def start(self, state, batch: int = 1):
        return {"states": state if state.shape[0] == batch else np.repeat(state, batch, axis=0), "kv": None}

    def step(self, ids, past):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if past["kv"] is None:
            out = self.decoder.run(self.first_outs, {"input_ids": ids, "encoder_hidden_states": past["states"]})
            past = {"states": past["states"], "kv": out[1:]}  # per layer: decoder k, v, encoder k, v
        else:
            out = self.with_past.run(self.next_outs, {"input_ids": ids, **dict(zip(self.past_names, past["kv"]))})
            kv = list(past["kv"])
            for i in range(self.L):
                kv[4 * i], kv[4 * i + 1] = out[1 + 2 * i], out[2 + 2 * i]
            past = {"states": past["states"], "kv": kv}
        return np.ascontiguousarray(out[0][:, -1], dtype=np.float32), past

    def reorder(self, past, index):
        return {"states": past["states"][index],
                "kv": None if past["kv"] is None else [a[index] for a in past["kv"]]}


def optimum_wrappers(model):
    """(encoder, decoder, decoder_with_past) torch modules with Optimum's inputs and outputs. The encoder gives the
    image encoder's own last_hidden_state (as transformers' does); the decoders apply ``enc_to_dec_proj`` when the
    model has one and compute the cross-attention keys and values themselves."""
    import torch

    image_encoder = getattr(model, "vision_model", None) or model.encoder
    proj = getattr(model, "enc_to_dec_proj", None)
    dec = model.decoder
    L = len(dec.new_cache().k)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = image_encoder

        def forward(self, pixel_values):
            return self.enc(pixel_values)

    core = _decoder_core(dec, L)  # (input_ids, past k/v..., cross k/v...) -> (logits, present k/v...)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec, self.proj, self.core = dec, proj, core

        def forward(self, input_ids, encoder_hidden_states):
            h = self.proj(encoder_hidden_states) if self.proj is not None else encoder_hidden_states
            cross = self.dec.cross_kv(h)
            B = input_ids.shape[0]
            empty = [k.new_zeros(B, k.shape[1], 0, k.shape[3]) for k, _ in cross for _ in (0, 1)]
            out = self.core(input_ids, *empty, *[t for kv in cross for t in kv])
            flat = [out[0]]
            for i, (ck, cv) in enumerate(cross):
                flat += [out[1 + 2 * i], out[2 + 2 * i], ck, cv]
            return tuple(flat)

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = core

        def forward(self, input_ids, *flat):
            past = [t for i in range(L) for t in (flat[4 * i], flat[4 * i + 1])]
            cross = [t for i in range(L) for t in (flat[4 * i + 2], flat[4 * i + 3])]
            return tuple(self.core(input_ids, *past, *cross))

    return Encoder().eval(), Decoder().eval(), DecoderWithPast().eval(), L


def _decoder_core(dec, n_layers: int):
    """The decoder as the shared export traces it (engine/backends/decoders.py): GPT-2 in its export form (the
    same function in fewer graph nodes), any other decoder as it is."""
    import copy

    from engine.backends.decoders import decoder_wrapper
    from engine.nn.gpt2 import GPT2LMHeadModel

    if isinstance(dec, GPT2LMHeadModel) and hasattr(dec, "fuse_for_export"):
        dec = copy.deepcopy(dec).fuse_for_export()
    return decoder_wrapper(dec, n_layers, True)


def export_optimum_layout(model, folder: Path, out_dir: Path, image_size: int, say=lambda m: None) -> dict:
    """Write the three Optimum graphs and the model's config, tokenizer and preprocessor files into ``out_dir``;
    returns the parity figure: greedy captions over these graphs vs torch (and the encoder state difference)."""
    import shutil

    import torch

    from engine.backends.common import export_graph
    from engine.backends.runtime import open_session

    out_dir = Path(out_dir)
    enc, dec, dec_past, L = optimum_wrappers(model)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, image_size, image_size, generator=g)
    say("writing the Optimum layout (encoder_model, decoder_model, decoder_with_past_model)")
    export_graph(enc, (px,), out_dir / OPTIMUM_FILES[0], ["pixel_values"], ["last_hidden_state"],
                 {"pixel_values": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}})
    with torch.inference_mode():
        states = enc(px)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    first_outs = ["logits"] + optimum_kv_names(L, "present")
    dyn = {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
           "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
           "logits": {0: "batch_size", 1: "decoder_sequence_length"}}
    for name in first_outs[1:]:
        dyn[name] = {0: "batch_size", 2: "decoder_sequence_length" if ".decoder." in name
                     else "encoder_sequence_length_out"}
    export_graph(dec, (ids, states), out_dir / OPTIMUM_FILES[1], ["input_ids", "encoder_hidden_states"],
                 first_outs, dyn)
    with torch.inference_mode():
        presents = dec(ids, states)[1:]
    past_names = optimum_kv_names(L, "past_key_values")
    next_outs = ["logits"] + optimum_kv_names(L, "present", ("decoder",))
    dyn = {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
           "logits": {0: "batch_size", 1: "decoder_sequence_length"}}
    for name in past_names:
        dyn[name] = {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in name
                     else "encoder_sequence_length_out"}
    for name in next_outs[1:]:
        dyn[name] = {0: "batch_size", 2: "total_decoder_sequence_length"}
    export_graph(dec_past, (ids[:, :2], *presents), out_dir / OPTIMUM_FILES[2], ["input_ids"] + past_names,
                 next_outs, dyn)
    for name in SIDE_FILES:
        if (Path(folder) / name).is_file():
            shutil.copy2(Path(folder) / name, out_dir / name)
    runner = OptimumLayoutRunner(*(open_session(out_dir / f) for f in OPTIMUM_FILES), L)
    o_states = runner.encode(px.numpy())
    diff = max_abs(states.numpy(), o_states)
    return {"max_abs_diff": float(f"{diff:.3g}"), "tolerance": ENCODER_TOLERANCE,
            "passed": bool(diff <= ENCODER_TOLERANCE), "runner": runner,
            "inputs": "2 random images; encoder last_hidden_state, then greedy captions compared by the caller"}
