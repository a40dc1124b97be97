"""The Llama decoder rewritten for export: the same function as ``plugins.text.llama`` with far fewer graph nodes.

A small decoder at batch 1 is bound by per-operator overhead in onnxruntime, not by arithmetic: tracing the
model as written gives about 450 nodes after onnxruntime's own optimisations (shape arithmetic for every view,
four nodes per ``rotate_half``, a ``Tile`` per GQA head repeat). This module computes the same thing with the
weights rearranged once at export time:

- one MatMul per layer for q, k, v *and* ``rotate_half(q)``, ``rotate_half(k)``: rotate_half is linear, so its
  matrix is folded into copies of the q and k weights; the attention scale is folded into the q weights;
- rotary cos/sin come from a table gathered by position (no ``Cos``/``Sin`` per step);
- grouped-query attention without repeating K/V: the query heads that share a K/V head are stacked along the
  sequence axis, so one MatMul serves the whole group;
- gate and up projections in one MatMul; the lm_head as its own (untied) weight, so int8 quantizes it too.

Inputs and outputs are those of ``plugins.text.onnx.decoder_wrapper``: ``input_ids`` (B, T), per layer
``past_key_values.{i}.key/value`` (B, n_kv, P, hs) -> ``logits`` (B, T, V), ``present.{i}.key/value``
(B, n_kv, P+T, hs). The parity gate compares it with the torch model like any other export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half_matrix(head_dim: int, n_heads: int) -> torch.Tensor:
    """R with ``x @ R == rotate_half(x)`` for x (..., n_heads * head_dim), head by head ([x1, x2] -> [-x2, x1])."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0  # first half of the output = -x2
    r[torch.arange(half), torch.arange(half) + half] = 1.0  # second half = x1
    return torch.block_diag(*[r] * n_heads)


class LlamaDecoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        c = model.config
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.group = self.nh // self.nkv
        self.eps = c.rms_norm_eps
        nh, nkv, hd = self.nh, self.nkv, self.hd
        m = model.model
        with torch.no_grad():
            inv = m.rotary_emb.inv_freq.float()
            freqs = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, hd)
            self.register_buffer("cos", torch.cat([emb.cos().repeat(1, nh), emb.cos().repeat(1, nkv)], 1))
            self.register_buffer("sin", torch.cat([emb.sin().repeat(1, nh), emb.sin().repeat(1, nkv)], 1))
            rot = torch.block_diag(rotate_half_matrix(hd, nh), rotate_half_matrix(hd, nkv))
            self.register_buffer("embed", m.embed_tokens.weight.detach().float().clone())
            self.layers = nn.ModuleList()
            for layer in m.layers:
                a, mlp = layer.self_attn, layer.mlp
                qk = torch.cat([a.q_proj.weight.t() * hd ** -0.5, a.k_proj.weight.t()], 1).float()
                block = nn.Module()
                block.register_buffer("w_in", layer.input_layernorm.weight.detach().float().clone())
                block.register_buffer("w_attn", torch.cat([qk, qk @ rot, a.v_proj.weight.t().float()], 1).contiguous())
                block.register_buffer("w_o", a.o_proj.weight.t().float().contiguous())
                block.register_buffer("w_post", layer.post_attention_layernorm.weight.detach().float().clone())
                block.register_buffer("w_gu", torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], 1)
                                      .float().contiguous())
                block.register_buffer("w_down", mlp.down_proj.weight.t().float().contiguous())
                self.layers.append(block)
            self.register_buffer("w_norm", m.norm.weight.detach().float().clone())
            self.register_buffer("w_lm", model.lm_head.weight.t().float().contiguous().clone())

    @staticmethod
    def supports(model) -> bool:
        """Bias-free projections and an even head size (anything else exports through the plain model)."""
        c = model.config
        return not c.attention_bias and not c.mlp_bias and c.head_dim % 2 == 0

    def norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, input_ids, *past):
        nh, nkv, hd, group = self.nh, self.nkv, self.hd, self.group
        B, T = input_ids.shape
        P = past[0].shape[2]
        x = F.embedding(input_ids, self.embed)
        pos = torch.arange(T) + P
        cos, sin = self.cos[pos], self.sin[pos]  # (T, (nh + nkv) * hd)
        allowed = torch.arange(P + T)[None, :] <= pos[:, None]  # (T, P + T)
        mask = torch.where(allowed, 0.0, float("-inf")).repeat(group, 1)  # (group * T, P + T): row g * T + t
        qk_width = (nh + nkv) * hd
        present = []
        for i, blk in enumerate(self.layers):
            h = self.norm(x, blk.w_in) @ blk.w_attn
            qk = h[..., :qk_width] * cos + h[..., qk_width:2 * qk_width] * sin
            q = qk[..., :nh * hd].reshape(B, T, nkv, group, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, group * T, hd)
            k = qk[..., nh * hd:].reshape(B, T, nkv, hd).transpose(1, 2)
            v = h[..., 2 * qk_width:].reshape(B, T, nkv, hd).transpose(1, 2)
            k = torch.cat([past[2 * i], k], 2)
            v = torch.cat([past[2 * i + 1], v], 2)
            present += [k, v]
            att = torch.softmax(q @ k.transpose(2, 3) + mask, dim=-1) @ v  # (B, nkv, group * T, hd)
            att = att.reshape(B, nkv, group, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)
            x = x + att @ blk.w_o
            g, u = (self.norm(x, blk.w_post) @ blk.w_gu).chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ blk.w_down
        return (self.norm(x, self.w_norm) @ self.w_lm, *present)
