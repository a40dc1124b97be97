"""Decoder graphs shared by every family with a KV-cached decoder (text decoders, the captioner's decoder).

The exported graph: inputs ``input_ids`` (batch, sequence) int64 and ``past_key_values.{i}.key/value``
(batch, n_kv, past_sequence, head_dim) [and ``cross.{i}.key/value`` for a decoder with cross-attention]; outputs
``logits`` (batch, sequence, vocab) float32 and ``present.{i}.key/value`` (batch, n_kv, past_sequence + sequence,
head_dim). Prefill passes an empty past. torch is imported inside the functions only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.backends.common import DECODER_TOLERANCE, max_abs

PARITY_BATCH, PARITY_PROMPT, PARITY_STEPS = 2, 7, 6
GELU_OPSET = 20  # the first opset with Gelu(approximate="tanh") as one operator


def decoder_wrapper(model, n_layers: int, cross: bool = False):
    """A module whose forward takes flat tensors (ids, past k/v..., [cross k/v...]) and returns flat outputs."""
    import torch

    from engine.nn.cache import TraceCache

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
            cache = TraceCache(past, cross_kv)
            logits, _ = self.model(input_ids, past=cache)
            out = [logits.float()]
            for k, v in cache.present:
                out += [k, v]
            return tuple(out)

    return DecoderGraph().eval()


def export_decoder(model, cfg: dict, path: Path, cross_shape=None, module=None) -> None:
    """Write the decoder graph; ``cross_shape`` = (n_heads, S_enc, head_dim) adds ``cross.*`` inputs. ``module``: a
    family's compact export form of ``model`` (same inputs and outputs as ``decoder_wrapper``), else GPT-2's or the
    traced model as written."""
    import torch

    from engine.backends.common import OPSET, export_graph, kv_names

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
    import copy

    from engine.nn.gpt2 import GPT2LMHeadModel

    opset = OPSET
    if module is None and isinstance(model, GPT2LMHeadModel):  # its export form: same function, fewer nodes
        module = decoder_wrapper(copy.deepcopy(model).fuse_for_export(), L, cross_shape is not None)
        opset = GELU_OPSET
    elif module is None:
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
