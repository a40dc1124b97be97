"""Stable Diffusion's image autoencoder in the layout of diffusers' ``AutoencoderKL``: parameter names match
diffusers, so a diffusers state dict loads by key copy.

``encode(images in [-1, 1]) -> (mean, logvar)`` of the latent distribution (before the scaling factor);
``decode(latents) -> images in about [-1, 1]`` (latents already divided by the scaling factor);
``decode_tiled`` decodes overlapping tiles and blends their seams linearly (diffusers' ``tiled_decode``), so a
1024 x 1024 image decodes in the memory of one tile. The blocks are the U-Net's (engine/nn/unet.py): ResnetBlock2D
without a time embedding, Downsample2D with asymmetric padding, Upsample2D, and one single-head attention layer in
each middle block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ModelError
from engine.configs import read
from engine.nn.unet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        size = d.get("sample_size")
        cfg = read(cls, {**d, "sample_size": size[0]} if isinstance(size, (list, tuple)) and size else d, "VAE")
        if cfg.act_fn != "silu":
            raise ModelError(f"The VAE uses act_fn {cfg.act_fn!r}; only 'silu' is supported.")
        bad = {t for t in cfg.down_block_types if t != "DownEncoderBlock2D"} | \
              {t for t in cfg.up_block_types if t != "UpDecoderBlock2D"}
        if bad:
            raise ModelError(f"The VAE has block types {sorted(bad)}; only DownEncoderBlock2D and UpDecoderBlock2D "
                             "are supported.")
        return cfg


class VAEAttention(nn.Module):
    """The middle block's single-head self-attention over all positions, with its own group norm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class CoderBlock(nn.Module):
    """DownEncoderBlock2D (``downsamplers``) or UpDecoderBlock2D (``upsamplers``): resnets, then the resampling."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, EPS)
                                     for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            CoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, "down" if i < len(ch) - 1 else "")
            for i, c in enumerate(ch))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            CoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else "")
            for i, c in enumerate(ch))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @property
    def factor(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x):
        """(mean, logvar) of the latent distribution of images ``x`` (B, 3, H, W) in [-1, 1]."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_tiled(self, z, tile: int | None = None, overlap: float = 0.25):
        """``decode`` in overlapping tiles of ``tile`` latents (default: the config's sample size / factor), the
        seams blended linearly over ``overlap`` of a tile; the same result as diffusers' tiled decoding."""
        from engine.diffusion import TorchArrays
        from engine.diffusion.tiles import decode_tiled

        return decode_tiled(TorchArrays(), self.decode, z, tile or self.config.sample_size // self.factor,
                            self.factor, overlap)
