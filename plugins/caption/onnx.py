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


def load_caption(model_folder, model_hash=None, threads=None, export_dir=None):
    """(OnnxCaptionRunner, light config) for a caption model folder's preferred export, or for ``export_dir``."""
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import Export, open_export

    export = Export(Path(export_dir), threads) if export_dir else open_export(Path(model_folder), model_hash, threads)
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
    from engine.backends.common import describe_graphs, export_graph, kv_names, quantize_graphs, replace_graphs
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
    say(f"exporting the ViT encoder ({S}x{S}) and the GPT-2 decoder ({dec.n_layer} layers) to ONNX")
    L = dec.n_layer
    example = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    enc_outs = ["encoder_hidden_states"] + kv_names(L, "cross")
    dyn = {"pixel_values": {0: "batch"}}
    dyn.update({n: {0: "batch"} for n in enc_outs})
    export_graph(encoder_wrapper(model), (example,), enc_path, ["pixel_values"], enc_outs, dyn)
    n_tokens = mc.encoder.num_patches + 1 if hasattr(mc.encoder, "num_patches") else None
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
    options.get("gate", lambda p: None)(parity)
    graphs, opset = describe_graphs({"encoder": enc_path, "decoder": dec_path})
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

        gate = {f"decoder_logits_{scheme}": quantized_parity(from_images(runner), from_images(q_runner),
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
