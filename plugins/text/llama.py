"""Llama (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention), nanoGPT-style.

Parameter names are those of transformers' ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.0.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``), so a Hugging Face
state dict loads by key copy (``load_hf_state_dict``).

    model = LlamaForCausalLM(LlamaConfig.from_dict(config_json_dict))
    logits, past = model(input_ids, past=None, use_cache=True, logits_to_keep=0)   # (B, T) -> (B, T, V)
    logits, past = model.step(input_ids, past)                                     # last position, float32
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.nn.blocks import tie_for_export
from engine.nn.cache import KVCache, additive_mask, causal_mask


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2), not on o
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlamaConfig":
        """From a transformers ``config.json`` dict (``rope_parameters`` or the older top-level ``rope_theta``)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise ValueError("sliding-window attention is not supported yet")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """config.json as transformers' LlamaConfig writes it."""
        return {
            "architectures": ["LlamaForCausalLM"], "attention_bias": self.attention_bias, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "head_dim": self.head_dim,
            "hidden_act": self.hidden_act, "hidden_size": self.hidden_size, "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size, "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": self.mlp_bias, "model_type": "llama", "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers, "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float16", "use_cache": True,
            "vocab_size": self.vocab_size,
        }


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables for the positions asked; the frequencies stay float32 whatever the model's dtype."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d = config.head_dim
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self._on = {}  # device -> inv_freq there (a plain attribute, so .to(dtype) leaves it float32)

    def forward(self, positions, dtype):  # positions (T,) or (B, T) -> cos, sin (T, hs) or (B, T, hs)
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R (hs, hs) with ``x @ R == rotate_half(x)``: one small MatMul in an exported graph instead of four nodes."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0  # first half of the output = -x2
    r[torch.arange(half), torch.arange(half) + half] = 1.0  # second half = x1
    return r


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C, b = config.hidden_size, config.attention_bias
        qkv = b or config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=qkv)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=b)

    def fuse_for_export(self) -> None:
        """The export form of this layer, from the same weights: one projection for q, k and v (the attention
        scale folded into q's rows), rotate_half as a small matrix, and grouped-query attention without
        repeating K/V (the query heads that share a K/V head are stacked along the sequence axis). The separate
        projections leave this copy of the model, so the graph stores each weight once."""
        hs, scale = self.head_dim, self.head_dim ** -0.5
        w = torch.cat([self.q_proj.weight * scale, self.k_proj.weight, self.v_proj.weight])
        self.qkv = nn.Linear(w.shape[1], w.shape[0], bias=self.q_proj.bias is not None).to(w.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(w)
            if self.q_proj.bias is not None:
                self.qkv.bias.copy_(torch.cat([self.q_proj.bias * scale, self.k_proj.bias, self.v_proj.bias]))
        del self.q_proj, self.k_proj, self.v_proj
        self.register_buffer("rot", rotate_half_matrix(hs).to(w.dtype), persistent=False)

    def _forward_export(self, x, cos, sin, past, mask):
        """``mask``: additive (group * T, P + T) or (B, 1, group * T, P + T), row g * T + t for position t of the
        query heads' group g."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv, self.head_dim
        h = self.qkv(x)
        qk = h[..., :(nh + nkv) * hs].reshape(B, T, nh + nkv, hs)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hs) or (B, T, 1, hs): across the heads
        qk = qk * cos + (qk @ self.rot) * sin  # rotary positions for q and k at once
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, n_kv, T, hs)
        v = h[..., (nh + nkv) * hs:].reshape(B, T, nkv, hs).transpose(1, 2)
        if past is not None:
            k, v = past.update(self.layer_idx, k, v)
        q = q.reshape(B, nkv, (nh // nkv) * T, hs)  # heads of a group share K/V: stacked along the sequence
        y = torch.softmax(q @ k.transpose(2, 3) + mask, dim=-1) @ v  # (B, n_kv, group * T, hs)
        return self.o_proj(y.reshape(B, nh, T, hs).transpose(1, 2).reshape(B, T, nh * hs))

    def forward(self, x, cos, sin, past: Optional[KVCache] = None, mask=None):
        if hasattr(self, "qkv"):
            return self._forward_export(x, cos, sin, past, mask)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = past.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)

    def fuse_for_export(self) -> None:
        """gate and up in one projection (one MatMul in the graph); the separate ones leave this copy."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up = nn.Linear(w.shape[1], w.shape[0], bias=self.gate_proj.bias is not None).to(w.dtype)
        with torch.no_grad():
            self.gate_up.weight.copy_(w)
            if self.gate_proj.bias is not None:
                self.gate_up.bias.copy_(torch.cat([self.gate_proj.bias, self.up_proj.bias]))
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if hasattr(self, "gate_up"):
            g, u = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, past=None, mask=None, dropout: float = 0.0):
        a = self.self_attn(self.input_layernorm(x), cos, sin, past=past, mask=mask)
        x = x + (F.dropout(a, dropout) if dropout else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (F.dropout(m, dropout) if dropout else m)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.dropout = 0.0  # residual dropout, training only (not part of the transformers config)
        self.exported = False  # set by LlamaForCausalLM.fuse_for_export

    def forward(self, input_ids, past: Optional[KVCache] = None, position_ids=None, attention_mask=None):
        """``position_ids`` (B, T) and ``attention_mask`` (B, P + T), both optional, are read by the export form
        only (the exported graph's inputs of those names; a left-padded batch passes both)."""
        B, T = input_ids.shape
        start = past.length if past is not None else 0
        x = self.embed_tokens(input_ids)  # (B, T, C)
        positions = torch.arange(T, device=x.device) + start
        if self.exported and position_ids is not None:
            positions = position_ids
        cos, sin = self.rotary_emb(positions, x.dtype)
        if self.exported:  # additive, one copy per query head of a group (LlamaAttention._forward_export)
            group = self.config.num_attention_heads // self.config.num_key_value_heads
            mask = additive_mask(T, start, x.dtype, x.device, attention_mask)
            mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, 1, group, 1)
        else:
            mask = causal_mask(T, start, x.device) if start > 0 else None
        p = self.dropout if self.training else 0.0
        for layer in self.layers:
            x = layer(x, cos, sin, past=past, mask=mask, dropout=p)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids, past: Optional[KVCache] = None, use_cache: bool = True, logits_to_keep: int = 0,
                position_ids=None, attention_mask=None):
        if past is None and use_cache:
            past = self.new_cache()
        h = self.model(input_ids, past=past if use_cache else None, position_ids=position_ids,
                       attention_mask=attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h), (past if use_cache else None)

    def fuse_for_export(self) -> "LlamaForCausalLM":
        """Turn this model (a copy made for the export) into its export form: fused q/k/v and gate/up
        projections, grouped-query attention without repeats (see LlamaAttention.fuse_for_export), a tied
        embedding stored once (engine.nn.blocks.TiedTable). It computes
        the same function; the ONNX exporter traces it. Returns self."""
        if self.config.head_dim % 2:
            raise ValueError("rotary embeddings need an even head size")
        for layer in self.model.layers:
            layer.self_attn.fuse_for_export()
            layer.mlp.fuse_for_export()
        self.model.embed_tokens, self.lm_head = tie_for_export(self.model.embed_tokens, self.lm_head)  # stored once
        self.model.exported = True
        return self.eval()

    @torch.inference_mode()
    def step(self, input_ids, past=None):
        """Decoding interface: last-position logits (B, V) as float32, and the updated cache."""
        logits, past = self(input_ids, past=past, logits_to_keep=1)
        return logits[:, -1].float(), past


def load_hf_state_dict(model: LlamaForCausalLM, state: dict) -> None:
    """Copy a transformers state dict (strict); a missing ``lm_head.weight`` is taken from tied embeddings."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and model.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
