"""ONNX export of the text decoders (Llama, GPT-2) and their onnxruntime runner.

The exported graph ``decoder.onnx``: inputs ``input_ids`` (batch, sequence) int64 and
``past_key_values.{i}.key/value`` (batch, n_kv, past_sequence, head_dim); outputs ``logits``
(batch, sequence, vocab) float32 and ``present.{i}.key/value`` (batch, n_kv, past_sequence + sequence, head_dim).
Prefill passes an empty past (past_sequence = 0). torch is imported inside the export functions only.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from engine.onnx.common import DECODER_TOLERANCE, max_abs

log = logging.getLogger(__name__)

PARITY_BATCH, PARITY_PROMPT, PARITY_STEPS = 2, 7, 6


# ----- runtime (no torch) ------------------------------------------------------------------------
def load_decoder(model_folder, model_hash=None, threads=None):
    """(OnnxDecoder, export) for a text model folder's preferred export."""
    from engine.onnx.decoder import OnnxDecoder
    from engine.onnx.runtime import open_export

    export = open_export(Path(model_folder), model_hash, threads)
    return OnnxDecoder(export.session("decoder"), export.manifest["config"]), export


# ----- export (torch) ----------------------------------------------------------------------------
def load_torch_model(folder, family: str):
    """The fp32 torch model of a Llama or GPT-2 folder, in eval mode (engine.text.models.load_model)."""
    import torch

    from engine.text.models import load_model

    return load_model(folder, family, "cpu", torch.float32)


def runtime_config(model, family: str) -> dict:
    c = model.config
    if family == "llama":
        return {"family": family, "n_layers": c.num_hidden_layers, "n_kv_heads": c.num_key_value_heads,
                "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_positions": c.max_position_embeddings,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    return {"family": family, "n_layers": c.n_layer, "n_kv_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
            "vocab_size": c.vocab_size, "max_positions": c.n_positions, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id}


def decoder_wrapper(model, n_layers: int, cross: bool = False):
    """A module whose forward takes flat tensors (ids, past k/v..., [cross k/v...]) and returns flat outputs."""
    import torch

    from engine.onnx.common import ConcatCache

    class DecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *flat):
            past = [(flat[2 * i], flat[2 * i + 1]) for i in range(n_layers)]
            cross_kv = None
            if cross:
                base = 2 * n_layers
                cross_kv = [(flat[base + 2 * i], flat[base + 2 * i + 1]) for i in range(n_layers)]
            cache = ConcatCache(past, cross_kv)
            logits, _ = self.model(input_ids, past=cache)
            out = [logits.float()]
            for k, v in cache.present:
                out += [k, v]
            return tuple(out)

    return DecoderGraph().eval()


def export_decoder(model, cfg: dict, path: Path, cross_shape=None) -> None:
    """Write the decoder graph; ``cross_shape`` = (n_heads, S_enc, head_dim) adds ``cross.*`` inputs."""
    import torch

    from engine.onnx.common import OPSET, export_graph, kv_names

    L, H, D = cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"]
    g = torch.Generator().manual_seed(0)
    B, T, P = 2, 3, 2  # example sizes of at least 2 so no axis is frozen
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    flat = [torch.randn(B, H, P, D, generator=g) * 0.1 for _ in range(2 * L)]
    names = ["input_ids"] + kv_names(L, "past_key_values")
    outs = ["logits"] + kv_names(L, "present")
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dyn.update({n: {0: "batch", 2: "past_sequence"} for n in names[1:]})
    dyn.update({n: {0: "batch", 2: "total_sequence"} for n in outs[1:]})
    if cross_shape is not None:
        Hc, S, Dc = cross_shape
        flat += [torch.randn(B, Hc, max(S, 2), Dc, generator=g) * 0.1 for _ in range(2 * L)]
        cnames = kv_names(L, "cross")
        names += cnames
        dyn.update({n: {0: "batch", 2: "encoder_sequence"} for n in cnames})
    from engine.onnx import gpt2_graph
    from engine.onnx.llama_graph import LlamaDecoderGraph

    opset = OPSET
    # the same functions in far fewer graph nodes
    if cfg.get("family") == "llama" and cross_shape is None and LlamaDecoderGraph.supports(model):
        module = LlamaDecoderGraph(model).eval()
    elif gpt2_graph.GPT2DecoderGraph.supports(model):
        module, opset = gpt2_graph.GPT2DecoderGraph(model, cross_shape is not None).eval(), gpt2_graph.OPSET
    else:
        module = decoder_wrapper(model, L, cross_shape is not None)
    export_graph(module, (ids, *flat), path, names, outs, dyn, opset)


def decoder_parity(torch_step, onnx_decoder, vocab: int, start_cache=None, onnx_cache=None, seed: int = 0) -> dict:
    """Prefill PARITY_PROMPT tokens (batch PARITY_BATCH), then PARITY_STEPS cached steps fed with torch's greedy
    tokens; the max |logit difference| over all of them, and how many greedy picks agree.

    ``torch_step(ids (B, T) np.int64, cache) -> (logits (B, T, V) np.float32, cache)``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(PARITY_BATCH, PARITY_PROMPT), dtype=np.int64)
    lt, tc = torch_step(ids, start_cache)
    lo, oc = onnx_decoder(ids, onnx_cache)
    diff, agree, total = max_abs(lt, lo), 0, 0
    for _ in range(PARITY_STEPS):
        tok_t, tok_o = lt[:, -1].argmax(-1), lo[:, -1].argmax(-1)
        agree += int((tok_t == tok_o).sum())
        total += tok_t.size
        ids = tok_t[:, None].astype(np.int64)
        lt, tc = torch_step(ids, tc)
        lo, oc = onnx_decoder(ids, oc)
        diff = max(diff, max_abs(lt, lo))
    return {"max_abs_diff": float(f"{diff:.3g}"), "tolerance": DECODER_TOLERANCE, "passed": bool(diff <= DECODER_TOLERANCE),
            "greedy_agreement": f"{agree}/{total}", "max_abs_logit": float(f"{float(np.abs(lt).max()):.4g}"),
            "inputs": f"batch {PARITY_BATCH}, prompt {PARITY_PROMPT} tokens, then {PARITY_STEPS} cached steps"}


def torch_stepper(model):
    import torch

    def step(ids, cache):
        with torch.inference_mode():
            if cache is None:
                cache = model.new_cache()
            logits, cache = model(torch.from_numpy(np.ascontiguousarray(ids)), past=cache)
            return logits.float().numpy(), cache

    return step


# ----- quality of int8 -----------------------------------------------------------------------------
def corpus_dir() -> Path:
    env = os.environ.get("STUDIO_SHAKESPEARE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"


def heldout_text(studio: dict, chars: int = 6000):
    """(name, text): the first ``chars`` characters of the model's first held-out work (default hamlet.txt)."""
    works = (studio.get("scores") or {}).get("heldout_works") or ["hamlet.txt"]
    if isinstance(works, str):
        works = [w.strip() for w in works.split(",")]
    path = corpus_dir() / works[0]
    if not path.is_file():
        return None, None
    return works[0], path.read_text(encoding="utf-8")[:chars]


def bits_per_char(logits_fn, ids: list, n_chars: int, context: int) -> float:
    """Total nats of the tokens over non-overlapping windows of ``context`` tokens / ln 2 / characters."""
    nats = 0.0
    for start in range(0, len(ids) - 1, context):
        window = np.array(ids[start:start + context + 1], dtype=np.int64)
        if len(window) < 2:
            break
        logits = np.asarray(logits_fn(window[None, :-1])[0], dtype=np.float64)  # (T, V)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nats -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
    return nats / math.log(2) / n_chars


def text_quality(folder: Path, studio: dict, torch_model, fp32_decoder, int8_decoder, vocab: int, max_pos: int,
                 greedy_tokens: int = 32) -> dict:
    """Held-out bits per character under torch fp32, onnxruntime fp32 and int8, and greedy agreement."""
    from tokenizers import Tokenizer

    out = {}
    name, text = heldout_text(studio)
    tok_path = Path(folder) / "tokenizer.json"
    if text and tok_path.is_file():
        ids = [i for i in Tokenizer.from_file(str(tok_path)).encode(text).ids if i < vocab]
        context = min(max_pos - 1, 256)
        step = torch_stepper(torch_model)
        bpc_t = bits_per_char(lambda x: step(x, None)[0], ids, len(text), context)
        bpc_f = bits_per_char(lambda x: fp32_decoder(x)[0], ids, len(text), context)
        bpc_q = bits_per_char(lambda x: int8_decoder(x)[0], ids, len(text), context)
        out.update({"heldout": f"first {len(text)} characters of {name}", "bpc_torch_fp32": round(bpc_t, 4),
                    "bpc_onnx_fp32": round(bpc_f, 4), "bpc_onnx_int8": round(bpc_q, 4),
                    "bpc_cost_int8": round(bpc_q - bpc_f, 4)})
        prompt = np.array([ids[:16]], dtype=np.int64)
    else:
        out["heldout"] = "not measured (held-out text or tokenizer not found)"
        prompt = np.random.default_rng(0).integers(0, vocab, size=(1, 16), dtype=np.int64)
    n = min(greedy_tokens, max_pos - prompt.shape[1])
    seqs = []
    for dec in (fp32_decoder, int8_decoder):
        toks, (logits, past) = [], dec.step(prompt)
        for _ in range(n):
            t = int(logits[0].argmax())
            toks.append(t)
            logits, past = dec.step(np.array([[t]], dtype=np.int64), past)
        seqs.append(toks)
    same = next((i for i, (a, b) in enumerate(zip(*seqs)) if a != b), n)
    out["greedy_int8_matches_fp32_for_tokens"] = f"{same}/{n}"
    return out


# ----- the exporter ---------------------------------------------------------------------------------
def export_text(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the llama and gpt2 families (see engine.onnx_export for the contract)."""
    import torch

    from engine.onnx.common import describe_graphs, quantize_graph, replace_graphs
    from engine.onnx.decoder import OnnxDecoder
    from engine.onnx.runtime import open_session

    say = options.get("log") or (lambda m: None)
    torch.manual_seed(0)
    model = load_torch_model(model_ref.path, model_ref.family)
    cfg = runtime_config(model, model_ref.family)
    path = Path(out_dir) / "decoder.onnx"
    say(f"exporting the {model_ref.family} decoder ({cfg['n_layers']} layers) to ONNX")
    export_decoder(model, cfg, path)
    graphs, opset = describe_graphs({"decoder": path})
    fp32 = OnnxDecoder(open_session(path), cfg)
    say("checking parity with PyTorch")
    parity = {"decoder_logits": decoder_parity(torch_stepper(model), fp32, cfg["vocab_size"])}
    options.get("gate", lambda p: None)(parity)
    result = {"graphs": graphs, "parity": parity, "config": cfg, "opset": opset}
    if options.get("quantize") == "int8":
        say("quantizing the weights to int8 and measuring the quality cost")
        qpath = Path(out_dir) / "decoder.int8.onnx"
        quantize_graph(path, qpath)
        int8 = OnnxDecoder(open_session(qpath), cfg)
        quality = text_quality(Path(model_ref.path), model_ref.studio, model, fp32, int8, cfg["vocab_size"],
                               cfg["max_positions"])
        quality["int8_vs_torch_logits"] = decoder_parity(torch_stepper(model), int8, cfg["vocab_size"])["max_abs_diff"]
        del fp32, int8
        replace_graphs(((qpath, path),))
        result["quantization"] = {"quality": quality}
    return result
