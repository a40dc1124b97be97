"""ViT image encoder in the layout of transformers' ``ViTModel`` (transformers 5 parameter names).

Patch embedding (a strided conv), a class token, learned position embeddings, pre-norm transformer
layers and a final layernorm. Parameter names match ``ViTModel.state_dict()`` so loading a reference
state dict is a key copy; checkpoints saved with the older names (``encoder.layer.N.attention.attention.query``)
are renamed by ``rename_legacy_keys``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from engine.errors import ModelError
from engine.nn.blocks import MLP, self_attention
from engine.configs import check_attention, read


@dataclass
class ViTConfig:
    """transformers' ViTConfig / DeiTConfig (a captioner's encoder); its defaults are transformers' (a config.json
    that leaves a key out means what it means there; tests/test_config_read.py holds them to it)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    distillation: bool = False  # DeiT: a distillation token after the class token

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        kind = d.get("model_type", "vit")
        if kind not in ENCODER_TYPES:
            raise ModelError(f"The caption encoder {kind!r} is not supported; this studio runs ViT and DeiT encoders "
                             "(BEiT, Swin, ConvNeXt and others are not implemented).")
        square = {}
        for name in ("image_size", "patch_size"):
            if isinstance(d.get(name), (list, tuple)):
                if len(set(d[name])) != 1:
                    raise ModelError(f"The ViT encoder's {name} must be square, not {list(d[name])}.")
                square[name] = d[name][0]
        cfg = read(cls, {**d, **square}, "ViT encoder", distillation=kind == "deit")
        check_attention(cfg, "ViT encoder")
        return cfg

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "distillation"}
        d.update(model_type="deit" if self.distillation else "vit", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 initializer_range=0.02, encoder_stride=self.patch_size, pooler_act="tanh",
                 pooler_output_size=self.hidden_size)
        return dict(sorted(d.items()))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Encoder states per image: the patches, the class token and DeiT's distillation token."""
        return self.num_patches + 1 + int(self.distillation)


ENCODER_TYPES = ("vit", "deit")


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values):  # (B, C, H, W) -> (B, N, D)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        if cfg.distillation:
            self.distillation_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden_size))

    def forward(self, pixel_values):
        x = self.patch_embeddings(pixel_values)  # (B, N, D)
        first = [self.cls_token.expand(x.shape[0], -1, -1)]
        if hasattr(self, "distillation_token"):
            first.append(self.distillation_token.expand(x.shape[0], -1, -1))
        return torch.cat(first + [x], dim=1) + self.position_embeddings  # (B, N+1 or N+2, D)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.o_proj(self_attention(x, self.q_proj, self.k_proj, self.v_proj, self.n_head))


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(cfg)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


class ViTModel(nn.Module):
    """``ViTModel`` without the pooler (captioning reads every token)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.layers = nn.ModuleList([ViTLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=std)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=std)

    def forward(self, pixel_values):  # (B, C, H, W) -> (B, N+1, D)
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"expected {size}x{size} pixels, got {tuple(pixel_values.shape[-2:])}")
        x = self.embeddings(pixel_values.to(self.embeddings.cls_token.dtype))
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x)


_LEGACY = [  # (old, new) as transformers' conversion_mapping does for ViTModel
    (re.compile(r"encoder\.layer\."), "layers."),
    (re.compile(r"attention\.attention\.query"), "attention.q_proj"),
    (re.compile(r"attention\.attention\.key"), "attention.k_proj"),
    (re.compile(r"attention\.attention\.value"), "attention.v_proj"),
    (re.compile(r"attention\.output\.dense"), "attention.o_proj"),
    (re.compile(r"intermediate\.dense"), "mlp.fc1"),
    (re.compile(r"(layers\.\d+\.)output\.dense"), r"\1mlp.fc2"),
]


def rename_legacy_keys(key: str) -> str:
    """A ViT parameter name of transformers 4 (``encoder.layer.0.attention.attention.query.weight``) in today's names."""
    for pattern, new in _LEGACY:
        key = pattern.sub(new, key)
    return key


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """(1, grid*grid + 1, dim) fixed 2-D sine-cosine position codes (MAE style; zeros for the class token),
    a training initialisation that lets a small ViT read positions from the first step."""
    if dim % 4:
        raise ValueError("sine-cosine position codes need a hidden size divisible by 4")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angles = coord[:, None] * omega[None, :]  # (N, dim/4)
        parts += [torch.sin(angles), torch.cos(angles)]
    pos = torch.cat(parts, dim=1).float()  # (N, dim)
    return torch.cat([torch.zeros(1, dim), pos])[None]
