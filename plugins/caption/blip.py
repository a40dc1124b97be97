"""BLIP captioner in the layout of transformers' ``BlipForConditionalGeneration``: a ViT-style vision model
(``vision_model.*``: fused qkv attention, pre-norm layers, a final ``post_layernorm``) and a BERT-style text decoder
with cross-attention (``text_decoder.*``, plugins/caption/bert.py). A folder saved by transformers loads by key copy.

Generation follows BLIP's: the decoder starts from ``text_config.bos_token_id`` ([DEC]), optionally followed by
a text prefix ("a picture of"), and stops at ``text_config.sep_token_id`` ([SEP]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ModelError
from engine.nn.blocks import PreNormEncoder
from engine.configs import check_attention, read
from plugins.caption.bert import BertDecoderConfig, BertLMHeadDecoder, clean_bert_state
from plugins.caption.vit import ViTConfig

# transformers' defaults for the keys a BLIP config.json may leave out
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 384, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072}


@dataclass
class BlipConfig:
    encoder: ViTConfig
    decoder: BertDecoderConfig
    decoder_start_token_id: int  # text_config.bos_token_id ([DEC])
    eos_token_id: int  # text_config.sep_token_id ([SEP]) ends a caption
    pad_token_id: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> "BlipConfig":
        if cfg.get("model_type") != "blip":
            raise ModelError(f"config.json has model_type {cfg.get('model_type')!r}, not 'blip'.")
        arch = cfg.get("architectures") or ["BlipForConditionalGeneration"]
        if "BlipForConditionalGeneration" not in arch:
            raise ModelError(f"This BLIP model is a {arch[0]}; only BlipForConditionalGeneration (captioning) "
                             "is supported, not question answering or image-text matching.")
        vision = read(ViTConfig, {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}, "BLIP vision model")
        check_attention(vision, "BLIP vision model")
        text = cfg.get("text_config") or {}
        decoder = BertDecoderConfig.from_dict({**TEXT_DEFAULTS, **text}, vision.hidden_size, type_vocab=False,
                                              where="BLIP text decoder")
        start, eos, pad = text.get("bos_token_id", 30522), text.get("sep_token_id", 102), text.get("pad_token_id", 0)
        for name, value in (("bos_token_id", start), ("sep_token_id", eos)):
            if not isinstance(value, int) or not 0 <= value < decoder.vocab_size:
                raise ModelError(f"config.json: text_config.{name} {value!r} is outside the vocabulary of "
                                 f"{decoder.vocab_size} tokens.")
        return cls(vision, decoder, start, eos, pad or 0, extra=cfg)


class BlipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.projection(y.transpose(1, 2).reshape(B, T, C))


class BlipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class BlipVisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BlipEmbeddings(cfg)
        self.encoder = PreNormEncoder(cfg, BlipAttention)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, N+1, D)
        S = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (S, S):
            raise ValueError(f"expected {S}x{S} pixels, got {tuple(pixel_values.shape[-2:])}")
        x = self.embeddings(pixel_values.to(self.embeddings.class_embedding.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class BlipCaptionModel(nn.Module):
    """``encode(pixel_values)`` and ``decoder`` (new_cache / cross_kv / step) as TorchCaptionRunner needs them."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.vision_model = BlipVisionModel(config.encoder)
        self.text_decoder = BertLMHeadDecoder(config.decoder)

    @property
    def decoder(self):
        return self.text_decoder

    def encode(self, pixel_values):
        return self.vision_model(pixel_values)

    def forward(self, pixel_values, decoder_input_ids):
        """Teacher-forced logits (B, T, V) (parity tests)."""
        return self.text_decoder(decoder_input_ids, cross=self.text_decoder.cross_kv(self.encode(pixel_values)))[0]


def clean_state(state: dict) -> dict:
    state = {k: v for k, v in state.items() if k.startswith(("vision_model.", "text_decoder."))}
    return clean_bert_state(state, "text_decoder.")
