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


def decoder_wrapper(model, n_layers: int, cross: bool = False, positions: bool = False):
    """A module whose forward takes flat tensors (ids, [attention_mask, position_ids,] past k/v..., [cross k/v...])
    and returns flat outputs."""
    import torch

    from engine.nn.cache import TraceCache

    class DecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *flat):
            extra = {}
            if positions:
                extra = {"attention_mask": flat[0], "position_ids": flat[1]}
                flat = flat[2:]
            past = [(flat[2 * i], flat[2 * i + 1]) for i in range(n_layers)]
            cross_kv = None
            if cross:
                base = 2 * n_layers
                cross_kv = [(flat[base + 2 * i], flat[base + 2 * i + 1]) for i in range(n_layers)]
            cache = TraceCache(past, cross_kv)
            logits, _ = self.model(input_ids, past=cache, **extra)
            out = [logits.float()]
            for k, v in cache.present:
                out += [k, v]
            return tuple(out)

    return DecoderGraph().eval()


def export_decoder(model, cfg: dict, path: Path, cross_shape=None, module=None, positions: bool = False) -> None:
    """Write the decoder graph; ``cross_shape`` = (n_heads, S_enc, head_dim) adds ``cross.*`` inputs; ``positions``
    adds ``attention_mask`` (batch, total_sequence) and ``position_ids`` (batch, sequence) int64 after
    ``input_ids`` (the layout onnxruntime-genai and Optimum load). ``module``: a family's compact export form of
    ``model`` (same inputs and outputs as ``decoder_wrapper``), else GPT-2's or the traced model as written."""
    import torch

    from engine.backends.common import OPSET, export_graph, kv_names

    L, H, D = cfg["n_layers"], cfg["n_kv_heads"], cfg["head_dim"]
    g = torch.Generator().manual_seed(0)
    B, T, P = 2, 3, 2  # example sizes of at least 2 so no axis is frozen
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    flat = [torch.randn(B, H, P, D, generator=g) * 0.1 for _ in range(2 * L)]
    names = ["input_ids"] + kv_names(L, "past_key_values")
    if positions:
        mask = torch.ones(B, P + T, dtype=torch.int64)
        mask[0, 0] = 0  # a left-padded row, so the mask is used
        flat = [mask, (torch.arange(T) + P).expand(B, T).contiguous()] + flat
        names = ["input_ids", "attention_mask", "position_ids"] + names[1:]
    outs = ["logits"] + kv_names(L, "present")
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dyn.update({n: {0: "batch", 2: "past_sequence"} for n in names if n.startswith("past_key_values.")})
    dyn.update({"attention_mask": {0: "batch", 1: "total_sequence"}, "position_ids": {0: "batch", 1: "sequence"}}
               if positions else {})
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
        module = decoder_wrapper(copy.deepcopy(model).fuse_for_export(), L, cross_shape is not None, positions)
        opset = GELU_OPSET
    elif module is None:
        module = decoder_wrapper(model, L, cross_shape is not None, positions)
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


# The gate of a quantized decoder, against the fp32 graph on a fixed prompt set: the share of positions whose top-1
# token agrees, and the largest logit difference as a fraction of the largest |fp32 logit|.
QUANT_PROMPTS, QUANT_PROMPT_LEN, QUANT_STEPS = 4, 12, 8
QUANT_TOLERANCE = {"int8": {"min_top1_agreement": 0.9, "max_rel_logit_diff": 0.15},
                   "int4": {"min_top1_agreement": 0.75, "max_rel_logit_diff": 0.35}}


def quantized_parity(fp32_decoder, q_decoder, vocab: int, scheme: str, seed: int = 1) -> dict:
    """Gate figures of a quantized decoder (``QUANT_TOLERANCE[scheme]``): prefill QUANT_PROMPTS fixed prompts of
    QUANT_PROMPT_LEN tokens, then QUANT_STEPS cached steps fed with the fp32 graph's greedy tokens; top-1 agreement
    over every position, and the largest |logit difference| against the stated tolerance. Both decoders take
    ``(ids (B, T), cache) -> (logits (B, T, V), cache)``."""
    tol = QUANT_TOLERANCE[scheme]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(QUANT_PROMPTS, QUANT_PROMPT_LEN), dtype=np.int64)
    lf, cf = fp32_decoder(ids, None)
    lq, cq = q_decoder(ids, None)
    diff, scale, agree, total = 0.0, 0.0, 0, 0
    for step in range(QUANT_STEPS + 1):
        diff = max(diff, max_abs(lf, lq))
        scale = max(scale, float(np.abs(lf).max()))
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        total += lf.shape[0] * lf.shape[1]
        if step == QUANT_STEPS:
            break
        ids = lf[:, -1].argmax(-1)[:, None].astype(np.int64)
        lf, cf = fp32_decoder(ids, cf)
        lq, cq = q_decoder(ids, cq)
    top1 = agree / total
    limit = tol["max_rel_logit_diff"] * scale
    passed = bool(top1 >= tol["min_top1_agreement"] and diff <= limit)
    return {"against": "the fp32 ONNX graph", "scheme": scheme, "max_abs_diff": float(f"{diff:.3g}"),
            "tolerance": float(f"{limit:.3g}"), "max_abs_logit": float(f"{scale:.4g}"),
            "top1_agreement": round(top1, 4), "min_top1_agreement": tol["min_top1_agreement"], "passed": passed,
            "rule": f"top-1 agreement >= {tol['min_top1_agreement']:.0%} and max |logit diff| <= "
                    f"{tol['max_rel_logit_diff']:g} x max |fp32 logit|",
            "inputs": f"{QUANT_PROMPTS} prompts of {QUANT_PROMPT_LEN} tokens (seed {seed}), then {QUANT_STEPS} "
                      "cached greedy steps; agreement over all positions"}
