"""A conditional U-Net in the layout of diffusers' ``UNet2DConditionModel``.

Parameter names match diffusers, so a diffusers state dict loads by key copy. Only the
config options the studio uses are implemented; any other value raises ``ModelError``.
Blocks: ResnetBlock2D (with time embedding), Transformer2DModel (BasicTransformerBlock:
self-attention, cross-attention to the text, GEGLU feed-forward), CrossAttnDownBlock2D /
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ModelError
from engine.configs import read


@dataclass
class UNetConfig:
    sample_size: Optional[int] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int = 1
    attention_head_dim: object = 8  # int or tuple; diffusers uses it as the number of heads
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: Optional[str] = None  # None | "projection"
    projection_class_embeddings_input_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    resnet_time_scale_shift: str = "default"  # "default" (add) | "scale_shift" (FiLM after norm2)

    # options whose only supported value is diffusers' default
    _FIXED = {
        "only_cross_attention": (False,), "dual_cross_attention": (False,), "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
"resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0, 1), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
        "attention_type": ("default",), "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,), "num_attention_heads": (None,), "reverse_transformer_layers_per_block": (None,),
        "addition_time_embed_dim": (None,),
    }

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Build from a diffusers config dict; ModelError for options this implementation does not support."""
        for key, allowed in cls._FIXED.items():
            if key in d and d[key] not in allowed:
                raise ModelError(f"U-Net option {key}={d[key]!r} is not supported by the studio's U-Net.")
        for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
            if isinstance(d.get(name), (list, tuple)):  # SDXL's per-block values
                raise ModelError(f"Unsupported U-Net config: {name} must be a single integer.")
        cfg = read(cls, {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}, "U-Net")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg):
            raise ModelError(f"Unsupported U-Net config: {msg}.")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            bad("down_block_types, up_block_types and block_out_channels must have the same length")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                bad(f"down block type {t!r}")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                bad(f"up block type {t!r}")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn",):
            bad(f"mid_block_type {self.mid_block_type!r}")
        if self.act_fn != "silu":
            bad(f"act_fn {self.act_fn!r}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            bad(f"resnet_time_scale_shift {self.resnet_time_scale_shift!r}")
        if self.class_embed_type not in (None, "projection"):
            bad(f"class_embed_type {self.class_embed_type!r}")
        if self.class_embed_type == "projection" and not self.projection_class_embeddings_input_dim:
            bad("class_embed_type 'projection' needs projection_class_embeddings_input_dim")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            bad("every block_out_channels value must be divisible by norm_num_groups")

    def heads(self) -> tuple:
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, (tuple, list)) else (h,) * len(self.block_out_channels)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim) (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float,
                 output_scale_factor: float = 1.0, scale_shift: bool = False):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.scale_shift = scale_shift
        self.time_emb_proj = (nn.Linear(temb_channels, 2 * out_channels if scale_shift else out_channels)
                              if temb_channels else None)  # None: the VAE's blocks, which take no time
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):  # x: (B, Cin, H, W), temb: (B, T)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is None:
            h = self.norm2(h)
        elif self.scale_shift:  # FiLM: the embedding scales and shifts the normalised features
            scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.time_emb_proj(F.silu(temb))[:, :, None, None])
        h = self.conv2(F.silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: Optional[int] = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):  # x: (B, N, C), context: (B, M, Ck)
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)  # (B, nh, N, hs)
        out = out.transpose(1, 2).reshape(B, N, -1)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the residual."""

    def __init__(self, heads: int, channels: int, layers: int, cross_attention_dim: int, groups: int,
                 linear_projection: bool, upcast: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.linear = linear_projection
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, cross_attention_dim, upcast) for _ in range(layers)])
        self.proj_out = proj()

    def forward(self, x, context):  # x: (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (``cross=True``) or DownBlock2D."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, temb: int, heads: int, cross: bool, downsample: bool):
        super().__init__()
        g, eps, L = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block
        ss = cfg.resnet_time_scale_shift == "scale_shift"
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, eps, scale_shift=ss) for i in range(L)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, cout, cfg.transformer_layers_per_block, cfg.cross_attention_dim, g,
                                cfg.use_linear_projection, cfg.upcast_attention) for _ in range(L)]) if cross else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)]) if downsample else None

    def forward(self, x, temb, context):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (``cross=True``) or UpBlock2D: each resnet takes a skip from the down path."""

    def __init__(self, cfg: UNetConfig, cin: int, prev: int, cout: int, temb: int, heads: int, cross: bool,
                 upsample: bool):
        super().__init__()
        g, eps, L = cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block + 1
        ss = cfg.resnet_time_scale_shift == "scale_shift"
        self.resnets = nn.ModuleList()
        for i in range(L):
            skip = cin if i == L - 1 else cout
            rin = prev if i == 0 else cout
            self.resnets.append(ResnetBlock2D(rin + skip, cout, temb, g, eps, scale_shift=ss))
        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, cout, cfg.transformer_layers_per_block, cfg.cross_attention_dim, g,
                                cfg.use_linear_projection, cfg.upcast_attention) for _ in range(L)]) if cross else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x, skips, temb, context, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, channels: int, temb: int, heads: int):
        super().__init__()
        g, eps, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        ss = cfg.resnet_time_scale_shift == "scale_shift"
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb, g, eps, s, ss) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(heads, channels, cfg.transformer_layers_per_block,
                                                            cfg.cross_attention_dim, g, cfg.use_linear_projection,
                                                            cfg.upcast_attention)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch = cfg.block_out_channels
        heads = cfg.heads()
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
                                if cfg.class_embed_type == "projection" else None)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cfg, cin, cout, temb, heads[i], kind == "CrossAttnDownBlock2D",
                                              downsample=i < len(ch) - 1))
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], temb, heads[-1])
        self.up_blocks = nn.ModuleList()
        rch, rheads = list(reversed(ch)), list(reversed(heads))
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout = cout, rch[i]
            cin = rch[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cfg, cin, prev, cout, temb, rheads[i], kind == "CrossAttnUpBlock2D",
                                          upsample=i < len(ch) - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        """sample (B, Cin, H, W), timestep scalar or (B,), encoder_hidden_states (B, M, D) -> (B, Cout, H, W)."""
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                     cfg.freq_shift).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given when class_embed_type is set")
            emb = emb + self.class_embedding(class_labels.to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        sizes = []
        for block in self.down_blocks:
            sizes.append(x.shape[-2:])
            x, outs = block(x, emb, encoder_hidden_states)
            skips.extend(outs)
        x = self.mid_block(x, emb, encoder_hidden_states)
        n = len(self.up_blocks)
        for i, block in enumerate(self.up_blocks):
            size = tuple(sizes[n - 1 - i - 1]) if i < n - 1 else None  # the size of the next finer level
            x = block(x, skips, emb, encoder_hidden_states, size)
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)
