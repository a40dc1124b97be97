"""Llama (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention), nanoGPT-style.

Parameter names are those of transformers' ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.0.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``), so a Hugging Face
state dict loads by key copy (``load_hf_state_dict``).

    model = LlamaForCausalLM(LlamaConfig.from_dict(config_json_dict))
    logits, past = model(input_ids, past=None, use_cache=True, logits_to_keep=0)   # (B, T) -> (B, T, V)
    logits, past = model.step(input_ids, past)                                     # last position, float32
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.nn.blocks import CausalLM, activation, load_strict, tie_for_export
from engine.nn.cache import KVCache, additive_mask, causal_mask, padded_mask
from engine.configs import read


@dataclass
class LlamaConfig:
    """transformers' LlamaConfig, with its defaults (tests/test_config_read.py holds them to it), plus the options
    by which the other decoder families differ from Llama (after bos/eos)."""
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
    # the options that make the other decoder families (plugins/text/families.py says which family sets which)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), in float32 (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too, and one before the MLP (Gemma 2 / 3)
    query_pre_attn_scalar: Optional[float] = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_logit_softcapping: Optional[float] = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: Optional[float] = None  # the same on the logits
    sliding_window: Optional[int] = None  # a sliding layer sees the keys at q - window < k <= q
    layer_types: Optional[list] = None  # "full_attention" | "sliding_attention" per layer
    rope: Optional[dict] = None  # rope parameters (rope_type, factor, ...); per layer type when keyed by type

    def __post_init__(self):
        if self.num_attention_heads < 1 or (self.num_key_value_heads or 1) < 1:
            raise ValueError("num_attention_heads and num_key_value_heads must be at least 1")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types does not give one type per layer")
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ValueError(f"unsupported attention layer type {sorted(bad)[0]!r}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers without a sliding_window")
        for params in rope_by_type(self).values():
            rope_inv_freq(params, self)  # refuses unsupported rope types now rather than at the first prompt

    @property
    def scaling(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_dict(cls, cfg: dict) -> "LlamaConfig":
        """From a transformers ``config.json`` dict (``rope_parameters`` or the older top-level ``rope_theta``)."""
        kw = {}
        if cfg.get("hidden_activation"):  # Gemma's name for it
            kw["hidden_act"] = cfg["hidden_activation"]
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial rotary embeddings (partial_rotary_factor {cfg['partial_rotary_factor']}) "
                             "are not supported")
        n = int(cfg.get("num_hidden_layers", cls.num_hidden_layers))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        if window is not None and not (isinstance(window, int) and window >= 0):  # 0: none, as null
            raise ValueError(f"sliding_window must be a positive whole number, not {window!r}")
        types = cfg.get("layer_types")
        if types is None and window:
            if "max_window_layers" in cfg:  # Qwen2 / Qwen3: sliding from that layer on
                types = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention" for i in range(n)]
            elif "sliding_window_pattern" in cfg or cfg.get("model_type", "").startswith("gemma"):
                every = int(cfg.get("sliding_window_pattern", 2))  # Gemma 2 alternates; Gemma 3 says 6
                types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        if types is not None and "sliding_attention" not in types:
            window = None
        kw.update(sliding_window=window or None, layer_types=list(types) if types else None)
        rope = cfg.get("rope_parameters") or dict(cfg.get("rope_scaling") or {})
        if set(rope) & {"full_attention", "sliding_attention"}:  # one set of parameters per layer type (Gemma 3)
            kw["rope"] = {k: dict(v) for k, v in rope.items()}
        else:
            rope = {"rope_theta": cfg.get("rope_theta", cls.rope_theta), **rope}
            kw["rope_theta"] = rope["rope_theta"]
            kw["rope"] = rope
            if cfg.get("rope_local_base_freq"):  # older Gemma 3 configs: the sliding layers' own theta
                kw["rope"] = {"full_attention": rope,
                              "sliding_attention": {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}}
        return read(cls, cfg, "text model", **kw)

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
            "rope_parameters": self.rope or {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings, "torch_dtype": "float16", "use_cache": True,
            "vocab_size": self.vocab_size,
        }


class LlamaRMSNorm(nn.Module):
    """RMSNorm; ``offset`` (Gemma): scaled by (1 + weight) in float32, the weight starting at zero."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_by_type(config: LlamaConfig) -> dict:
    """{layer type: rope parameters}: one set for all layers, or the per-type sets of the config (Gemma 3)."""
    rope = config.rope or {"rope_theta": config.rope_theta}
    if set(rope) & {"full_attention", "sliding_attention"}:
        return {t: rope.get(t) or rope.get("full_attention") for t in ("full_attention", "sliding_attention")}
    return {t: rope for t in ("full_attention", "sliding_attention")}


def rope_inv_freq(params: dict, config: LlamaConfig, seq_len: int = 0) -> torch.Tensor:
    """Rotary inverse frequencies as transformers computes them for ``default``, ``linear``, ``llama3`` and
    ``dynamic`` (NTK, which depends on the sequence length once it passes max_position_embeddings)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    d, base = config.head_dim, float(params.get("rope_theta", config.rope_theta))
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        f = float(params["factor"])
        base = base * ((f * seq_len / config.max_position_embeddings) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        f, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables for the positions asked; the frequencies stay float32 whatever the model's dtype."""

    def __init__(self, config: LlamaConfig, params: Optional[dict] = None):
        super().__init__()
        self.config, self.params = config, params or {"rope_theta": config.rope_theta}
        self.dynamic = self.params.get("rope_type", self.params.get("type")) == "dynamic"
        self.inv_freq = rope_inv_freq(self.params, config)
        self._on = {}  # device -> inv_freq there (a plain attribute, so .to(dtype) leaves it float32)

    def forward(self, positions, dtype):  # positions (T,) or (B, T) -> cos, sin (T, hs) or (B, T, hs)
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        if self.dynamic and positions.numel() and not torch.jit.is_tracing():  # NTK past the trained length
            n = int(positions.max()) + 1
            if n > self.config.max_position_embeddings:
                inv = rope_inv_freq(self.params, self.config, n).to(positions.device)
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


def softcap(x, cap: Optional[float]):
    return x if cap is None else torch.tanh(x / cap) * cap


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scaling, self.cap = config.scaling, config.attn_logit_softcapping
        C, b = config.hidden_size, config.attention_bias
        qkv = b or config.qkv_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=qkv)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=qkv)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=b)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, config.norm_offset)
            self.k_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps, config.norm_offset)

    def fuse_for_export(self) -> None:
        """The export form of this layer, from the same weights: one projection for q, k and v (the attention
        scale folded into q's rows unless q is normalised per head), rotate_half as a small matrix, and
        grouped-query attention without repeating K/V (the query heads that share a K/V head are stacked along
        the sequence axis). The separate projections leave this copy of the model, so the graph stores each
        weight once."""
        hs = self.head_dim
        scale = 1.0 if hasattr(self, "q_norm") else self.scaling
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
        if hasattr(self, "q_norm"):
            qk = torch.cat([self.q_norm(qk[:, :, :nh]) * self.scaling, self.k_norm(qk[:, :, nh:])], dim=2)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hs) or (B, T, 1, hs): across the heads
        qk = qk * cos + (qk @ self.rot) * sin  # rotary positions for q and k at once
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, n_kv, T, hs)
        v = h[..., (nh + nkv) * hs:].reshape(B, T, nkv, hs).transpose(1, 2)
        if past is not None:
            k, v = past.update(self.layer_idx, k, v)
        q = q.reshape(B, nkv, (nh // nkv) * T, hs)  # heads of a group share K/V: stacked along the sequence
        y = torch.softmax(softcap(q @ k.transpose(2, 3), self.cap) + mask, dim=-1) @ v  # (B, n_kv, group*T, hs)
        return self.o_proj(y.reshape(B, nh, T, hs).transpose(1, 2).reshape(B, T, nh * hs))

    def forward(self, x, cos, sin, past: Optional[KVCache] = None, mask=None):
        """``mask``: boolean (T, P + T) or (B, 1, T, P + T) (a padded batch), True where attention is allowed, or
        None for plain causal attention. ``cos``/``sin``: (T, hs), or (B, T, hs) for per-row positions."""
        if hasattr(self, "qkv"):
            return self._forward_export(x, cos, sin, past, mask)
        if cos.dim() == 3:  # (B, T, hs) -> (B, 1, T, hs): the same across the heads
            cos, sin = cos[:, None], sin[:, None]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = past.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
        if self.cap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               scale=self.scaling, enable_gqa=self.n_kv != self.n_head)
        else:  # soft-capped scores (Gemma 2): written out, SDPA has no cap
            group = self.n_head // self.n_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = softcap((q @ k.transpose(2, 3)) * self.scaling, self.cap)
            if mask is None and T > 1:
                mask = causal_mask(T, k.shape[2] - T, x.device)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=b)
        self.up_proj = nn.Linear(C, H, bias=b)
        self.down_proj = nn.Linear(H, C, bias=b)
        self.act = activation(config.hidden_act)

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
            return self.down_proj(self.act(g) * u)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(C, eps, off)
        self.post_attention_layernorm = LlamaRMSNorm(C, eps, off)  # Llama: before the MLP; Gemma: after attention
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = LlamaRMSNorm(C, eps, off)
            self.post_feedforward_layernorm = LlamaRMSNorm(C, eps, off)

    def forward(self, x, cos, sin, past=None, mask=None, dropout: float = 0.0):
        a = self.self_attn(self.input_layernorm(x), cos, sin, past=past, mask=mask)
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(F.dropout(a, dropout) if dropout else a)
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x + (F.dropout(m, dropout) if dropout else m)
        x = x + (F.dropout(a, dropout) if dropout else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (F.dropout(m, dropout) if dropout else m)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        ropes = rope_by_type(config)
        self.rotary_emb = LlamaRotaryEmbedding(config, ropes["full_attention"])
        if ropes["sliding_attention"] is not ropes["full_attention"]:  # Gemma 3: the sliding layers' own theta
            self.rotary_emb_local = LlamaRotaryEmbedding(config, ropes["sliding_attention"])
        self.dropout = 0.0  # residual dropout, training only (not part of the transformers config)
        self.exported = False  # set by LlamaForCausalLM.fuse_for_export

    def _masks(self, T: int, start: int, positions, device, dtype, attention_mask=None) -> dict:
        """{sliding: mask} for the layer kinds present: boolean (None: plain causal; (B, 1, T, P + T) for a padded
        batch, ``attention_mask`` (B, P + T)), or in the export form additive per query group
        (LlamaAttention._forward_export), with ``attention_mask`` when given."""
        window = self.config.sliding_window
        kinds = {layer.sliding for layer in self.layers}
        out = {}
        for sliding in kinds:
            slots = torch.arange(start + T, device=device)[None, :]
            query = torch.arange(T, device=device)[:, None] + start
            if self.exported:
                group = self.config.num_attention_heads // self.config.num_key_value_heads
                mask = additive_mask(T, start, dtype, device, attention_mask)
                if sliding:
                    mask = mask.masked_fill(slots <= query - window, torch.finfo(dtype).min)
                out[sliding] = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, 1, group, 1)
            elif attention_mask is not None:  # a left-padded batch; a window counts slots (a row's are contiguous)
                mask = padded_mask(T, start, device, attention_mask)
                out[sliding] = mask & (slots > query - window) | (slots == query) if sliding else mask
            elif sliding:
                out[sliding] = (slots <= positions[:, None]) & (slots > positions[:, None] - window)  # (T, P + T)
            else:
                out[sliding] = causal_mask(T, start, device) if start > 0 else None
        return out

    def forward(self, input_ids, past: Optional[KVCache] = None, position_ids=None, attention_mask=None):
        """``position_ids`` (B, T) and ``attention_mask`` (B, P + T), both optional: a left-padded batch passes both
        (the exported graph's inputs of those names)."""
        B, T = input_ids.shape
        start = past.length if past is not None else 0
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        positions = torch.arange(T, device=x.device) + start
        if position_ids is not None:
            positions = position_ids
        cos, sin = self.rotary_emb(positions, x.dtype)
        local = self.rotary_emb_local(positions, x.dtype) if hasattr(self, "rotary_emb_local") else (cos, sin)
        masks = self._masks(T, start, positions, x.device, x.dtype, attention_mask)
        p = self.dropout if self.training else 0.0
        for layer in self.layers:
            c, s = local if layer.sliding else (cos, sin)
            x = layer(x, c, s, past=past, mask=masks[layer.sliding], dropout=p)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.add_head(config.hidden_size, config.vocab_size, self.model.embed_tokens, config.tie_word_embeddings,
                      config.num_hidden_layers, config.max_position_embeddings)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, LlamaRMSNorm) and m.offset:
            nn.init.zeros_(m.weight)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, past: Optional[KVCache] = None, use_cache: bool = True, logits_to_keep: int = 0,
                position_ids=None, attention_mask=None):
        if past is None and use_cache:
            past = self.new_cache()
        h = self.model(input_ids, past=past if use_cache else None, position_ids=position_ids,
                       attention_mask=attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return softcap(self.lm_head(h), self.config.final_logit_softcapping), (past if use_cache else None)

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


def load_hf_state_dict(model: LlamaForCausalLM, state: dict, assign: bool = False) -> None:
    """Copy a transformers state dict (strict); a missing ``lm_head.weight`` is taken from tied embeddings.
    ``assign``: the model takes the given tensors themselves (memory-mapped ones stay mapped)."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and model.config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    load_strict(model, state, assign)
    if assign and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
