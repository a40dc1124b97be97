"""BERT-style text decoder with cross-attention, in the layout of transformers' ``BertLMHeadModel`` and
``BlipTextLMHeadModel`` (post-norm layers: self-attention, cross-attention on the image states, feed-forward; an MLM
prediction head). Parameter names match theirs (``bert.encoder.layer.N.attention.self.query``,
``cls.predictions.transform.dense``...), so loading is a key copy under a prefix (``text_decoder.`` for BLIP,
``decoder.`` for a VisionEncoderDecoderModel with a BERT decoder).

Offers the decoding calls of engine/nn/gpt2.py: ``new_cache()``, ``cross_kv(states)`` and ``step(ids, past)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ModelError
from engine.nn.blocks import ACTIVATIONS as ACTS
from engine.configs import check_attention, read
from engine.nn.cache import KVCache, causal_mask


@dataclass
class BertDecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    encoder_hidden_size: int
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2  # BERT adds token type 0's embedding; BLIP's text model has none (0)

    @property
    def n_positions(self) -> int:  # the name the caption pipeline reads
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @classmethod
    def from_dict(cls, d: dict, encoder_hidden_size: int, type_vocab: bool, where: str) -> "BertDecoderConfig":
        given = {} if type_vocab else {"type_vocab_size": 0}
        if not d.get("encoder_hidden_size"):
            given["encoder_hidden_size"] = encoder_hidden_size
        cfg = read(cls, d, where, **given)
        check_attention(cfg, where)
        pe = d.get("position_embedding_type", "absolute")
        if pe != "absolute":
            raise ModelError(f"The {where} uses position_embedding_type {pe!r}; only 'absolute' is supported.")
        return cfg


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, start: int):
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertDecoderConfig, kv_width: int):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def heads(self, x):  # (B, T, C) -> (B, nh, T, hs)
        return x.view(x.shape[0], x.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def kv(self, x):
        return self.heads(self.key(x)), self.heads(self.value(x))


class BertOutput(nn.Module):
    def __init__(self, width_in: int, cfg: BertDecoderConfig):
        super().__init__()
        self.dense = nn.Linear(width_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertDecoderConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertOutput(cfg.hidden_size, cfg)

    def forward(self, x, k, v, mask=None, is_causal=False):
        B, T, C = x.shape
        q = self.self.heads(self.self.query(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.output(y.transpose(1, 2).reshape(B, T, C), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTS[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertDecoderConfig, index: int):
        super().__init__()
        self.index = index
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.crossattention = BertAttention(cfg, cfg.encoder_hidden_size)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg)

    def forward(self, x, past: Optional[KVCache], cross_kv, mask=None, is_causal=False):
        k, v = self.attention.self.kv(x)
        if past is not None:
            k, v = past.update(self.index, k, v)
        x = self.attention(x, k, v, mask=mask, is_causal=is_causal)
        x = self.crossattention(x, *cross_kv)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, i) for i in range(cfg.num_hidden_layers)])


class BertModel(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class Predictions(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # transformers ties decoder.bias to this

    def forward(self, x):
        return self.decoder(self.transform(x)) + self.bias


class Heads(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.predictions = Predictions(cfg)


class BertLMHeadDecoder(nn.Module):
    def __init__(self, cfg: BertDecoderConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = Heads(cfg)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def cross_kv(self, encoder_hidden_states) -> list:
        return [layer.crossattention.self.kv(encoder_hidden_states) for layer in self.bert.encoder.layer]

    def forward(self, input_ids, past: Optional[KVCache] = None, cross=None, logits_to_keep: int = 0):
        """(logits (B, T, V), past): GPT-2's calling convention (engine/nn/gpt2.py), so the shared decoder export
        (engine/backends/decoders.py) traces it as it is. ``cross``: per layer (K, V), else ``past.cross``."""
        if cross is None:
            cross = past.cross
        T = input_ids.shape[1]
        start = past.length if past is not None else 0
        x = self.bert.embeddings(input_ids, start)
        mask = causal_mask(T, start, x.device) if past is not None else None  # None for one new token
        is_causal = mask is None and T > 1
        for i, layer in enumerate(self.bert.encoder.layer):
            x = layer(x, past, cross[i], mask=mask, is_causal=is_causal)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.cls.predictions(x), past

    @torch.inference_mode()
    def step(self, input_ids, past: KVCache):
        """Last-position logits (B, V) as float32 and the cache (whose ``cross`` holds the image K/V)."""
        if past.length + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past.length + input_ids.shape[1]} tokens exceeds max_position_embeddings")
        logits, past = self(input_ids, past=past, logits_to_keep=1)
        return logits[:, -1].float(), past


def clean_bert_state(state: dict, prefix: str) -> dict:
    """Tied head weights filled in (``cls.predictions.decoder.weight`` from the word embeddings, the head bias from
    ``cls.predictions.decoder.bias``), the duplicate decoder bias, position-id buffers and poolers dropped."""
    p = prefix
    if p + "cls.predictions.decoder.weight" not in state and p + "bert.embeddings.word_embeddings.weight" in state:
        state[p + "cls.predictions.decoder.weight"] = state[p + "bert.embeddings.word_embeddings.weight"]
    dec_bias = state.pop(p + "cls.predictions.decoder.bias", None)
    if p + "cls.predictions.bias" not in state and dec_bias is not None:
        state[p + "cls.predictions.bias"] = dec_bias
    for key in [k for k in state if k.startswith(p) and (k.endswith(("position_ids", "token_type_ids")) or ".pooler." in k)]:
        del state[key]
    return state
