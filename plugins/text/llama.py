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

from engine.nn.cache import KVCache, causal_mask


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

    def forward(self, positions, dtype):  # positions (T,) -> cos, sin (T, hs)
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C, b = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=b)

    def forward(self, x, cos, sin, past: Optional[KVCache] = None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        start = 0
        if past is not None:
            start = past.length
            k, v = past.update(self.layer_idx, k, v)  # (B, n_kv, start+T, hs)
        gqa = self.n_kv != self.n_head
        if gqa and _exporting():  # exporters get the plain form: each K/V head repeated for its query heads
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and start == 0 and T > 1,
                                           enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)

    def forward(self, x):
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

    def forward(self, input_ids, past: Optional[KVCache] = None):
        B, T = input_ids.shape
        start = past.length if past is not None else 0
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(torch.arange(start, start + T, device=x.device), x.dtype)
        mask = causal_mask(T, start, x.device) if start > 0 else None
        p = self.dropout if self.training else 0.0
        for layer in self.layers:
            x = layer(x, cos, sin, past=past, mask=mask, dropout=p)
        if past is not None:
            past.length = start + T
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

    def forward(self, input_ids, past: Optional[KVCache] = None, use_cache: bool = True, logits_to_keep: int = 0):
        if past is None and use_cache:
            past = self.new_cache()
        h = self.model(input_ids, past=past if use_cache else None)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h), (past if use_cache else None)

    @torch.inference_mode()
    def step(self, input_ids, past=None):
        """Decoding interface: last-position logits (B, V) as float32, and the updated cache."""
        logits, past = self(input_ids, past=past, logits_to_keep=1)
        return logits[:, -1].float(), past


def load_hf_state_dict(model: LlamaForCausalLM, state: dict, assign: bool = False) -> None:
    """Copy a transformers state dict (strict); a missing ``lm_head.weight`` is taken from tied embeddings.
    ``assign``: the model takes the given tensors themselves (memory-mapped ones stay mapped)."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and model.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if missing or unexpected:
        raise KeyError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    if assign and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
