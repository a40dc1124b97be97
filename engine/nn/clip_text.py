"""A text encoder in the layout of transformers' ``CLIPTextModel`` (causal pre-LN transformer).

Parameter names match transformers' CLIPTextModel (``embeddings.token_embedding.weight``, ...; older
checkpoints' ``text_model.`` prefix is accepted), so its state dict loads by key copy. Returns the last hidden states (B, T, D) and the
pooled output (the final-layer-normed state at the first EOS token; argmax id when eos_token_id == 2,
as transformers does for old configs).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from engine.nn.blocks import PreNormEncoder, self_attention
from engine.configs import check_attention, read


@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig (a Stable Diffusion pipeline's text_encoder/config.json, the shapes model's
    text encoder); its defaults are transformers' (tests/test_config_read.py holds them to it)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_dim: int = 512  # unused by CLIPTextModel; kept so configs round-trip

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        cfg = read(cls, d, "text encoder")
        check_attention(cfg, "text encoder")
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_type"] = "clip_text_model"
        return d


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):  # (B, T) -> (B, T, D)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)[None]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, T, D)
        return self.out_proj(self_attention(x, self.q_proj, self.k_proj, self.v_proj, self.heads, causal=True))


class CLIPTextModel(nn.Module):
    """transformers 5 layout: ``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*``.

    Older checkpoints prefix these with ``text_model.``; ``strip_prefix`` accepts both.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = PreNormEncoder(cfg, CLIPAttention)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        """(B, T) token ids -> (last_hidden_state (B, T, D), pooler_output (B, D))."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"at most {self.config.max_position_embeddings} tokens")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)  # (B, T, D)
        if self.config.eos_token_id == 2:
            idx = input_ids.argmax(dim=-1)
        else:
            idx = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), idx]  # (B, D)
        return x, pooled


def strip_prefix(state_dict: dict) -> dict:
    """Accept transformers 4 names (``text_model.embeddings...``) as well as 5 (``embeddings...``)."""
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state_dict.items()
            if not k.endswith("position_ids")}
