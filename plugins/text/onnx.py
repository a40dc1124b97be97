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

from engine.backends.decoders import decoder_parity, export_decoder, torch_stepper

log = logging.getLogger(__name__)


# ----- runtime (no torch) ------------------------------------------------------------------------
def load_decoder(model_folder, model_hash=None, threads=None):
    """(OnnxDecoder, export) for a text model folder's preferred export."""
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_export

    export = open_export(Path(model_folder), model_hash, threads)
    return OnnxDecoder(export.session("decoder"), export.manifest["config"]), export


# ----- export (torch) ----------------------------------------------------------------------------
def load_torch_model(folder, family: str):
    """The fp32 torch model of a Llama or GPT-2 folder, in eval mode (plugins.text.models.load_model)."""
    import torch

    from plugins.text.models import load_model

    return load_model(folder, family, "cpu", torch.float32)


def runtime_config(model, family: str) -> dict:
    from plugins.text.llama import LlamaForCausalLM

    c = model.config
    if isinstance(model, LlamaForCausalLM):
        return {"family": family, "n_layers": c.num_hidden_layers, "n_kv_heads": c.num_key_value_heads,
                "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_positions": c.max_position_embeddings,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    return {"family": family, "n_layers": c.n_layer, "n_kv_heads": c.n_head, "head_dim": c.n_embd // c.n_head,
            "vocab_size": c.vocab_size, "max_positions": c.n_positions, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id}


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


def compact_graph(model, family: str):
    """What the exporter traces for a Llama: a copy of the model in its export form (fused projections,
    grouped-query attention without repeats: LlamaForCausalLM.fuse_for_export), wrapped to take and give flat
    tensors; None for the other families (engine.backends.decoders picks their form)."""
    import copy

    from engine.backends.decoders import decoder_wrapper

    from plugins.text.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return None
    return decoder_wrapper(copy.deepcopy(model).fuse_for_export(), model.config.num_hidden_layers)


# ----- the exporter ---------------------------------------------------------------------------------
def export_text(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the llama and gpt2 families (see engine.onnx_export for the contract)."""
    import torch

    from engine.backends.common import describe_graphs, quantize_graphs, replace_graphs
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_session

    say = options.get("log") or (lambda m: None)
    torch.manual_seed(0)
    model = load_torch_model(model_ref.path, model_ref.family)
    cfg = runtime_config(model, model_ref.family)
    path = Path(out_dir) / "decoder.onnx"
    say(f"exporting the {model_ref.family} decoder ({cfg['n_layers']} layers) to ONNX")
    export_decoder(model, cfg, path, module=compact_graph(model, model_ref.family))
    graphs, opset = describe_graphs({"decoder": path})
    fp32 = OnnxDecoder(open_session(path), cfg)
    say("checking parity with PyTorch")
    parity = {"decoder_logits": decoder_parity(torch_stepper(model), fp32, cfg["vocab_size"])}
    options.get("gate", lambda p: None)(parity)
    result = {"graphs": graphs, "parity": parity, "config": cfg, "opset": opset}
    if options.get("quantize") == "int8":
        say("quantizing the weights to int8 and measuring the quality cost")
        qpath = quantize_graphs({"decoder": path})["decoder"]
        int8 = OnnxDecoder(open_session(qpath), cfg)
        quality = text_quality(Path(model_ref.path), model_ref.studio, model, fp32, int8, cfg["vocab_size"],
                               cfg["max_positions"])
        quality["int8_vs_torch_logits"] = decoder_parity(torch_stepper(model), int8, cfg["vocab_size"])["max_abs_diff"]
        del fp32, int8
        replace_graphs(((qpath, path),))
        result["quantization"] = {"quality": quality}
    return result
