"""The GPT-2 decoder rewritten for export: the same function as ``engine.nn.gpt2`` with fewer graph nodes.

Tracing the model as written gives about 40 nodes per layer after onnxruntime's own optimisations (shape
arithmetic for every view, the causal-mask construction with ``IsNaN``/``Where`` in every layer, a decomposed
tanh GELU). At batch 1 a decoder's time is its weight reads plus a fixed cost per node, so this module computes
the same thing with the weights rearranged once at export time:

- the attention scale folded into the q columns of ``c_attn`` (weight and bias);
- the causal mask built once per call from the positions, not per layer;
- tanh GELU as one ``Gelu`` node (opset 20), LayerNorm as one ``LayerNormalization`` node;
- the lm_head as a separate transposed weight (as the plain export also ends up with), which int8 quantizes;
- cross-attention (the captioner's decoder) reads ``cross.{i}.key/value`` given as inputs.

Inputs and outputs are those of ``plugins.text.onnx.decoder_wrapper``: ``input_ids`` (B, T), per layer
``past_key_values.{i}.key/value`` (B, nh, P, hs) [, ``cross.{i}.key/value`` (B, nh, S, hs)] -> ``logits``
(B, T, V), ``present.{i}.key/value`` (B, nh, P+T, hs). The parity gate compares it with the torch model like any
other export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPSET = 20  # the first opset with Gelu(approximate="tanh") as one operator


def _const(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().clone()


class GPT2DecoderGraph(nn.Module):
    def __init__(self, model, cross: bool = False):
        super().__init__()
        c = model.config
        self.nh, self.hd, self.width = c.n_head, c.n_embd // c.n_head, c.n_embd
        self.eps = c.layer_norm_epsilon
        self.cross = cross
        t = model.transformer
        self.register_buffer("wte", _const(t.wte.weight))
        self.register_buffer("wpe", _const(t.wpe.weight))
        self.layers = nn.ModuleList()
        for block in t.h:
            a, mlp, blk = block.attn, block.mlp, nn.Module()
            scale = torch.ones(3 * c.n_embd)
            scale[:c.n_embd] = a.scaling
            for name, w in (("ln1", block.ln_1), ("ln2", block.ln_2)) + ((("lnx", block.ln_cross_attn),) if cross else ()):
                blk.register_buffer(f"{name}_w", _const(w.weight))
                blk.register_buffer(f"{name}_b", _const(w.bias))
            blk.register_buffer("w_qkv", _const(a.c_attn.weight * scale))
            blk.register_buffer("b_qkv", _const(a.c_attn.bias * scale))
            for name, lin in (("o", a.c_proj), ("fc", mlp.c_fc), ("proj", mlp.c_proj)):
                blk.register_buffer(f"w_{name}", _const(lin.weight))
                blk.register_buffer(f"b_{name}", _const(lin.bias))
            if cross:
                x = block.crossattention
                blk.register_buffer("w_xq", _const(x.q_attn.weight * x.scaling))
                blk.register_buffer("b_xq", _const(x.q_attn.bias * x.scaling))
                blk.register_buffer("w_xo", _const(x.c_proj.weight))
                blk.register_buffer("b_xo", _const(x.c_proj.bias))
            self.layers.append(blk)
        self.register_buffer("lnf_w", _const(t.ln_f.weight))
        self.register_buffer("lnf_b", _const(t.ln_f.bias))
        self.register_buffer("w_lm", _const(model.lm_head.weight.t()))

    @staticmethod
    def supports(model) -> bool:
        """A tanh-GELU GPT-2 (``gelu_new`` and its aliases); anything else exports through the plain model."""
        from engine.nn.gpt2 import GPT2LMHeadModel

        return (isinstance(model, GPT2LMHeadModel)
                and model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"))

    def norm(self, x, w, b):
        return F.layer_norm(x, (self.width,), w, b, self.eps)

    def heads(self, x, B, T):  # (B, T, C) -> (B, nh, T, hs)
        return x.reshape(B, T, self.nh, self.hd).transpose(1, 2)

    def attend(self, q, k, v, B, T, mask=None):
        s = q @ k.transpose(2, 3)
        att = torch.softmax(s if mask is None else s + mask, dim=-1) @ v
        return att.transpose(1, 2).reshape(B, T, self.width)

    def forward(self, input_ids, *inputs):
        B, T = input_ids.shape
        n = len(self.layers)
        past, cross = inputs[:2 * n], inputs[2 * n:]
        P = past[0].shape[2]
        pos = torch.arange(T) + P
        x = F.embedding(input_ids, self.wte) + self.wpe[pos]
        mask = torch.where(torch.arange(P + T)[None, :] <= pos[:, None], 0.0, float("-inf"))  # (T, P + T)
        C, present = self.width, []
        for i, blk in enumerate(self.layers):
            h = self.norm(x, blk.ln1_w, blk.ln1_b) @ blk.w_qkv + blk.b_qkv
            q, k, v = (self.heads(h[..., j * C:(j + 1) * C], B, T) for j in range(3))
            k = torch.cat([past[2 * i], k], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
            present += [k, v]
            x = x + self.attend(q, k, v, B, T, mask) @ blk.w_o + blk.b_o
            if self.cross:
                q = self.heads(self.norm(x, blk.lnx_w, blk.lnx_b) @ blk.w_xq + blk.b_xq, B, T)
                x = x + self.attend(q, cross[2 * i], cross[2 * i + 1], B, T) @ blk.w_xo + blk.b_xo
            h = F.gelu(self.norm(x, blk.ln2_w, blk.ln2_b) @ blk.w_fc + blk.b_fc, approximate="tanh")
            x = x + h @ blk.w_proj + blk.b_proj
        return (self.norm(x, self.lnf_w, self.lnf_b) @ self.w_lm, *present)
