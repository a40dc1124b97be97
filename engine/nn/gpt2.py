"""GPT-2 (learned positions, LayerNorm, GELU, Conv1D weights), optionally with cross-attention.

Parameter names are those of transformers' ``GPT2LMHeadModel`` (``transformer.wte.weight``,
``transformer.h.0.attn.c_attn.weight``, ..., ``lm_head.weight``), so a Hugging Face state dict loads by key copy
(see ``load_hf_state_dict``). With ``add_cross_attention=True`` every block also has ``crossattention``
(``c_attn`` for K/V of the encoder states, ``q_attn``, ``c_proj``) and ``ln_cross_attn``, exactly like
transformers, so the model serves as the decoder of a ``VisionEncoderDecoderModel`` (keys ``decoder.*``).

Call signature::

    model = GPT2LMHeadModel(GPT2Config.from_dict(config_json_dict))
    load_hf_state_dict(model, state_dict)            # copies keys; drops the old attn.bias buffers; ties lm_head
    logits, past = model(input_ids,                  # (B, T) int64
                         past=None,                  # a KVCache from a previous call, or None to start one
                         encoder_hidden_states=None, # (B, S_enc, n_embd) for cross-attention models
                         encoder_attention_mask=None,# (B, S_enc) 1 = attend, 0 = padding (optional)
                         use_cache=True,             # False: returns (logits, None) and keeps no state
                         logits_to_keep=0)           # 0: logits for all T positions; k: only the last k
    # logits: (B, T or k, vocab_size) in the model's dtype; past: engine.nn.cache.KVCache

Cross-attention K/V are computed from ``encoder_hidden_states`` on the first call and stored in ``past.cross``;
later calls with the same ``past`` reuse them (``encoder_hidden_states`` may then be omitted). They can also be
computed up front with ``past = model.new_cache(); past.cross = model.cross_kv(encoder_hidden_states)``.
For beam search, ``past.reorder(beam_index)`` selects batch rows of every buffer.
``model.step(ids, past) -> (last-position logits (B, V), past)`` is the decoding interface the text pipeline uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.nn.blocks import CausalLM, activation, load_strict, tie_for_export
from engine.configs import read
from engine.nn.cache import KVCache, additive_mask, causal_mask, padded_mask


@dataclass
class GPT2Config:
    """transformers' GPT2Config (GPT-2 language models, the captioners' decoders); its defaults are transformers'
    (tests/test_config_read.py holds them to it)."""
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256

    @classmethod
    def from_dict(cls, cfg: dict) -> "GPT2Config":
        """From a transformers ``config.json`` dict (also accepts the hidden_size/num_* aliases)."""
        aliases = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                   "max_position_embeddings": "n_positions"}
        return read(cls, cfg, "GPT-2", renamed=aliases)

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class Conv1D(nn.Module):
    """A linear layer with the weight stored transposed, (in, out), as in the original GPT-2 checkpoints."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_exporting():  # ONNX gets MatMul + Add (weight-only
            return x @ self.weight + self.bias                      # int8 quantizes MatMul, not Gemm)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, is_cross_attention: bool = False, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.scaling = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        if is_cross_attention:
            self.c_attn = Conv1D(2 * config.n_embd, config.n_embd)  # K, V from the encoder states
            self.q_attn = Conv1D(config.n_embd, config.n_embd)
        else:
            self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def _heads(self, x):  # (B, T, C) -> (B, nh, T, hs)
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def cross_kv(self, encoder_hidden_states):
        """K, V of the encoder states, each (B, nh, S_enc, hs); computed once per prompt."""
        k, v = self.c_attn(encoder_hidden_states).split(self.n_embd, dim=2)
        return self._heads(k), self._heads(v)

    def fuse_for_export(self) -> None:
        """Fold the attention scale into the query weights (so the graph has no Mul for it) and attend with
        plain MatMul/Softmax, which exports in fewer nodes than scaled_dot_product_attention."""
        with torch.no_grad():
            if self.is_cross_attention:
                self.q_attn.weight.mul_(self.scaling)
                self.q_attn.bias.mul_(self.scaling)
            else:
                self.c_attn.weight[:, :self.n_embd].mul_(self.scaling)
                self.c_attn.bias[:self.n_embd].mul_(self.scaling)
        self.scaling = 1.0
        self.exported = True

    def _attend(self, q, k, v, mask):
        s = q @ k.transpose(2, 3)
        return torch.softmax(s if mask is None else s + mask, dim=-1) @ v

    def forward(self, x, past: Optional[KVCache] = None, kv=None, mask=None):
        B, T, C = x.shape
        if self.is_cross_attention:
            q = self._heads(self.q_attn(x))
            k, v = kv
            is_causal = False
        else:
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, nh, T, hs)
            if past is not None:
                k, v = past.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
            is_causal = mask is None and T > 1  # with a past, the model passes the mask (causal_mask)
        if getattr(self, "exported", False):  # the export form: mask additive (T, P + T), or None across
            y = self._attend(q, k, v, None if self.is_cross_attention else mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(config.inner_dim, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.inner_dim)
        self.act = activation(config.activation_function)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if config.add_cross_attention:
            self.crossattention = GPT2Attention(config, is_cross_attention=True, layer_idx=layer_idx)
            self.ln_cross_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, past=None, mask=None, cross_kv=None, cross_mask=None):
        x = x + self.attn(self.ln_1(x), past=past, mask=mask)
        if cross_kv is not None:
            x = x + self.crossattention(self.ln_cross_attn(x), kv=cross_kv, mask=cross_mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, past=None, cross=None, encoder_attention_mask=None, position_ids=None,
                attention_mask=None):
        """``position_ids`` (B, T) and ``attention_mask`` (B, P + T), both optional: a left-padded batch passes both
        (the exported text graph's inputs of those names)."""
        B, T = input_ids.shape
        start = past.length if past is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds n_positions={self.config.n_positions}")
        exported = getattr(self, "exported", False)
        pos = torch.arange(start, start + T, device=input_ids.device)
        if position_ids is not None:
            pos = position_ids
        x = self.wte(input_ids) + self.wpe(pos)  # (B, T, C)
        if exported:  # one additive causal mask per call (GPT2Attention._attend)
            mask = additive_mask(T, start, x.dtype, x.device, attention_mask)
        elif attention_mask is not None:  # a left-padded batch
            mask = padded_mask(T, start, x.device, attention_mask)
        else:
            mask = causal_mask(T, start, x.device) if start > 0 else None
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = encoder_attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S_enc)
        for i, block in enumerate(self.h):
            x = block(x, past=past, mask=mask, cross_kv=None if cross is None else cross[i], cross_mask=cross_mask)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.add_head(config.n_embd, config.vocab_size, self.transformer.wte, config.tie_word_embeddings,
                      config.n_layer, config.n_positions)
        if not config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)

    def cross_kv(self, encoder_hidden_states) -> list:
        """Per layer (K, V) of the encoder states for cross-attention; store them in ``past.cross``."""
        return [blk.crossattention.cross_kv(encoder_hidden_states) for blk in self.transformer.h]

    def forward(self, input_ids, past: Optional[KVCache] = None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache: bool = True, logits_to_keep: int = 0, position_ids=None,
                attention_mask=None):
        if past is None and use_cache:
            past = self.new_cache()
        cross = None
        if self.config.add_cross_attention:
            if past is not None and past.cross is not None:
                cross = past.cross
            elif encoder_hidden_states is not None:
                cross = self.cross_kv(encoder_hidden_states)
                if past is not None:
                    past.cross = cross
        elif encoder_hidden_states is not None:
            raise ValueError("encoder_hidden_states given to a GPT-2 without add_cross_attention")
        h = self.transformer(input_ids, past=past if use_cache else None, cross=cross,
                             encoder_attention_mask=encoder_attention_mask, position_ids=position_ids,
                             attention_mask=attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h), (past if use_cache else None)

    def fuse_for_export(self) -> "GPT2LMHeadModel":
        """Turn this model (a copy made for the export) into its export form: attention scales folded into the
        weights, plain attention, one additive causal mask per call, the tied embedding stored once
        (engine.nn.blocks.TiedTable); with a tanh GELU the graph (opset 20) has
        one Gelu node per layer. Computes the same function; returns self."""
        for block in self.transformer.h:
            block.attn.fuse_for_export()
            if self.config.add_cross_attention:
                block.crossattention.fuse_for_export()
        self.transformer.wte, self.lm_head = tie_for_export(self.transformer.wte, self.lm_head)  # stored once
        self.transformer.exported = True
        return self.eval()


IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


def load_hf_state_dict(model: nn.Module, state: dict, prefix: str = "", assign: bool = False) -> None:
    """Copy a transformers state dict into ``model`` (strict): old causal-mask buffers are dropped, a missing
    ``lm_head.weight`` is taken from the tied embeddings. ``prefix`` (e.g. ``"decoder."``) is stripped first.
    ``assign``: the model takes the given tensors themselves (memory-mapped ones stay mapped)."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    if not any(k.startswith("transformer.") for k in state) and "wte.weight" in state:
        state = {("transformer." + k): v for k, v in state.items()}  # a bare GPT2Model checkpoint
        state["lm_head.weight"] = state["transformer.wte.weight"]
    load_strict(model, state, assign)
    if assign and getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.transformer.wte.weight
