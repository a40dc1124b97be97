"""Text-to-image sampling: encode the prompt, denoise with classifier-free guidance, decode to PIL.

The networks are reached only through two small interfaces (plugins/image/onnx.py implements them with
onnxruntime sessions):
  text encoder: ``encode(ids (B, T) int64) -> (hidden (B, T, D), pooled (B, D))``
  denoiser:     ``denoise(sample (B, C, H, W), timestep float, hidden, class_labels) -> (B, 3, H, W)``
Conditional and unconditional inputs go through the denoiser as ONE batch of 2B.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from plugins.image.schedulers import make_scheduler

log = logging.getLogger(__name__)


class TorchTextEncoder:
    def __init__(self, module, device="cpu", dtype=torch.float32):
        self.module, self.device, self.dtype = module, device, dtype

    @torch.no_grad()
    def __call__(self, ids):
        hidden, pooled = self.module(torch.as_tensor(ids, dtype=torch.long, device=self.device))
        return hidden.float(), pooled.float()


class TorchDenoiser:
    def __init__(self, module, device="cpu", dtype=torch.float32):
        self.module, self.device, self.dtype = module, device, dtype

    @torch.no_grad()
    def __call__(self, sample, timestep, hidden, pooled):
        d = dict(device=self.device, dtype=self.dtype)
        t = torch.full((sample.shape[0],), float(timestep), device=self.device)
        out = self.module(sample.to(**d), t, hidden.to(**d), pooled.to(**d))
        return out.float().cpu()


def coord_maps(size: int, n: int) -> torch.Tensor:
    """(1, n, S, S) fixed input maps: x then y, in [-1, 1] at pixel centres (n is 0 or 2)."""
    if n == 0:
        return torch.zeros(1, 0, size, size)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y])[None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class SampleSettings:
    steps: int = 20
    guidance: float = 1.5
    sampler: str = "dpmpp_2m"


def class_vector(hidden: torch.Tensor, pooled: torch.Tensor, ids, mode: str) -> torch.Tensor:
    """The U-Net's class_labels: the text encoder's pooled output, or the mean of its hidden states over the
    real (non-pad) tokens, which carries every word of the prompt directly."""
    if mode == "pooled":
        return pooled
    ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
    mask = (ids != 0).to(hidden.device, hidden.dtype)[:, :, None]  # (B, T, 1); [PAD] is id 0
    return (hidden * mask).sum(1) / mask.sum(1)


def sample_steps(text_encoder: Callable, denoiser: Callable, cfg, cond_ids, uncond_ids, settings: SampleSettings,
                 generator: torch.Generator) -> Iterator:
    """Denoise B images from noise, one step per iteration.

    ``cond_ids`` / ``uncond_ids``: (B, T) token ids. Yields ``(i, n, x0_estimate)`` after step i of n, and
    finally ``(n, n, x)`` with the images (B, 3, S, S) in [-1, 1]. Guidance: x = u + g (c - u), with u
    and c from one batched denoiser call (a guidance of 1 skips the unconditional half).
    """
    B = len(cond_ids)
    size = cfg.sample_size
    sched = make_scheduler(settings.sampler, cfg.scheduler)
    sched.set_timesteps(settings.steps)
    guided = settings.guidance != 1.0
    ids = np.concatenate([np.asarray(uncond_ids), np.asarray(cond_ids)]) if guided else np.asarray(cond_ids)
    hidden, pooled = text_encoder(ids)
    pooled = class_vector(hidden, pooled, ids, cfg.class_labels)
    coords = coord_maps(size, cfg.coord_channels).expand(len(ids), -1, -1, -1)
    x = torch.randn((B, 3, size, size), generator=generator) * sched.init_noise_sigma
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t)
        xin = torch.cat([xin, xin]) if guided else xin
        out = denoiser(torch.cat([xin, coords], dim=1), float(t), hidden, pooled)
        if guided:
            u, c = out.chunk(2)
            out = u + settings.guidance * (c - u)
        step = sched.step(out, t, x, generator=generator)
        x = step.prev_sample
        yield i + 1, n, step.pred_original_sample
    yield n, n, x.clamp(-1, 1)


def sample(*args, **kwargs) -> torch.Tensor:
    """``sample_steps`` run to the end: (B, 3, S, S) in [-1, 1]."""
    x = None
    for _, _, x in sample_steps(*args, **kwargs):
        pass
    return x


# ---------------------------------------------------------------- the studio-facing pipeline

def run(loaded, prompt: str, options: dict, seed: int, cancel=None) -> Iterator:
    """Yield Progress / Partial events and one Result for a loaded model (plugins.image.model.LoadedModel)."""
    from PIL import Image

    from engine.generators import Partial, Progress, Result

    from plugins.image.tokenizer import encode_prompts

    prompt = prompt or ""
    enc, neg, warnings = encode_prompts(loaded.prompt_encoder, prompt, options.get("negative_prompt", "") or "")
    settings = SampleSettings(int(options.get("steps", 20)), float(options.get("guidance", 1.5)),
                              options.get("sampler", "dpmpp_2m"))
    size = loaded.cfg.sample_size
    preview_every = max(1, settings.steps // 8)
    gen = torch.Generator().manual_seed(int(seed))
    text = TorchTextEncoder(loaded.text_encoder, loaded.device, loaded.dtype)
    den = TorchDenoiser(loaded.unet, loaded.device, loaded.dtype)
    t0 = time.perf_counter()
    yield Progress(0, settings.steps, "encoding the prompt")
    steps = sample_steps(text, den, loaded.cfg, [enc.ids], [neg.ids], settings, gen)
    x = None
    for k, (i, n, x) in enumerate(steps):
        if k == n:  # the final images
            break
        yield Progress(i, n, f"step {i}/{n}")
        if i % preview_every == 0 and i < n:
            yield Partial(image=Image.fromarray(to_uint8(x.float())[0]))
        if cancel is not None:
            cancel.raise_if_cancelled()
    elapsed = time.perf_counter() - t0
    image = Image.fromarray(to_uint8(x)[0])
    yield Result(image=image, warnings=warnings, info={
        "width": size, "height": size, "steps": settings.steps, "sampler": settings.sampler,
        "guidance": settings.guidance, "negative_prompt": options.get("negative_prompt", "") or "",
        "seconds": round(elapsed, 4), "unknown_words": enc.unknown, "truncated_words": enc.truncated})
