"""Text-to-image sampling: encode the prompt, denoise with classifier-free guidance, decode to PIL. No torch at
import: the onnxruntime backend never loads it.

The networks are reached only through two small interfaces, gathered with the model's settings in ``ImageNets``
(``torch_nets`` here; plugins/image/onnx.py builds them on onnxruntime sessions):
  text encoder: ``text(ids (B, T) int64) -> (hidden (B, T, D), pooled (B, D))``
  U-Net:        ``unet(sample (B, C, H, W), timestep float, hidden, class_labels) -> (B, 3, H, W)``
The sampling loop is engine.diffusion's, the same for both backends; conditional and unconditional inputs go
through the U-Net as ONE batch of 2B.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from engine.diffusion import SampleSettings, to_uint8  # noqa: F401  (re-exported for the family's callers)

log = logging.getLogger(__name__)


class TorchTextEncoder:
    def __init__(self, module, device="cpu", dtype=None):
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, ids):
        import torch

        with torch.no_grad():
            hidden, pooled = self.module(torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device))
        return hidden.float(), pooled.float()


class TorchDenoiser:
    def __init__(self, module, device="cpu", dtype=None):
        self.module, self.device, self.dtype = module, device, dtype

    def __call__(self, sample, timestep, hidden, pooled):
        import torch

        d = dict(device=self.device, dtype=self.dtype or torch.float32)
        with torch.no_grad():
            t = torch.full((sample.shape[0],), float(timestep), device=self.device)
            out = self.module(sample.to(**d), t, hidden.to(**d), pooled.to(**d))
        return out.float().cpu()


@dataclass
class ImageNets:
    """One backend's networks for the shapes model: ``xp`` (engine.diffusion's array adapter), the text encoder
    ``text(ids) -> (hidden, pooled)`` and the U-Net ``unet(sample, t, hidden, class_labels)``, plus the model's
    settings. The torch backend builds it in ``torch_nets``, the onnxruntime one in plugins/image/onnx.py."""
    xp: object
    text: Callable
    unet: Callable
    sample_size: int
    coord_channels: int
    class_labels: str
    scheduler: object  # engine.diffusion.schedulers.SchedulerConfig
    prompt_encoder: object = None
    info: dict = field(default_factory=dict)  # facts for the recipe (e.g. how the noise is drawn)


def torch_nets(loaded) -> ImageNets:
    """ImageNets of a loaded torch model (plugins.image.model.LoadedModel)."""
    from engine.diffusion import TorchArrays

    cfg = loaded.cfg
    return ImageNets(TorchArrays(), TorchTextEncoder(loaded.text_encoder, loaded.device, loaded.dtype),
                     TorchDenoiser(loaded.unet, loaded.device, loaded.dtype), cfg.sample_size, cfg.coord_channels,
                     getattr(cfg, "class_labels", "pooled"), cfg.scheduler, loaded.prompt_encoder)


def coord_maps(size: int, n: int) -> np.ndarray:
    """(1, n, S, S) fixed input maps: x then y, in [-1, 1] at pixel centres (n is 0 or 2)."""
    if n == 0:
        return np.zeros((1, 0, size, size), np.float32)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.stack([x, y])[None].astype(np.float32)


def class_vector(hidden, pooled, ids, mode: str):
    """The U-Net's class_labels: the text encoder's pooled output, or the mean of its hidden states over the
    real (non-pad) tokens, which carries every word of the prompt directly ([PAD] is id 0). Works on torch
    tensors and numpy arrays alike."""
    if mode == "pooled":
        return pooled
    if isinstance(hidden, np.ndarray):
        mask = (np.asarray(ids) != 0).astype(hidden.dtype)[:, :, None]  # (B, T, 1)
    else:  # torch tensors
        import torch

        ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
        mask = (ids != 0).to(hidden.device, hidden.dtype)[:, :, None]
    return (hidden * mask).sum(1) / mask.sum(1)


def denoiser(nets: ImageNets, cond_ids, uncond_ids, guided: bool) -> Callable:
    """``denoise(x, t)`` for engine.diffusion.sample_steps: the prompts encoded once, the class labels and the
    coordinate maps added, unconditional rows first when guided."""
    ids = np.concatenate([np.asarray(uncond_ids), np.asarray(cond_ids)]) if guided else np.asarray(cond_ids)
    hidden, pooled = nets.text(ids)
    labels = class_vector(hidden, pooled, ids, nets.class_labels)
    size, xp = nets.sample_size, nets.xp
    coords = xp.broadcast(xp.from_numpy(coord_maps(size, nets.coord_channels)),
                          (len(ids), nets.coord_channels, size, size))

    def denoise(x, t: float):
        return nets.unet(xp.cat([x, coords], axis=1), t, hidden, labels)
    return denoise


def sample_steps(nets: ImageNets, cond_ids, uncond_ids, settings: SampleSettings, generator) -> Iterator:
    """engine.diffusion.sample_steps for B prompts of the shapes model: yields (i, n, x0 estimate), then the
    images (B, 3, S, S) in [-1, 1]."""
    from engine.diffusion import sample_steps as loop

    den = denoiser(nets, cond_ids, uncond_ids, settings.guidance != 1.0)
    shape = (len(cond_ids), 3, nets.sample_size, nets.sample_size)
    return loop(nets.xp, den, shape, nets.scheduler, settings, generator)


def sample(nets: ImageNets, cond_ids, uncond_ids, settings: SampleSettings, seed: int) -> np.ndarray:
    """The final images of ``sample_steps`` as uint8 (B, S, S, 3), the noise drawn from ``seed``."""
    x = None
    for _, _, x in sample_steps(nets, cond_ids, uncond_ids, settings, nets.xp.generator(seed)):
        pass
    return to_uint8(nets.xp.to_numpy(x))


def generate_images(nets: ImageNets, captions: list, settings: SampleSettings, seed: int, batch: int = 100):
    """uint8 images for ``captions`` (unconditional: the empty prompt), ``batch`` at a time, chunk k's noise
    drawn from ``seed + k * batch``."""
    enc, out = nets.prompt_encoder, []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        out.append(sample(nets, [enc.encode(c).ids for c in chunk], [enc.encode("").ids for _ in chunk], settings,
                          seed + start))
    return np.concatenate(out)


# ---------------------------------------------------------------- the studio-facing pipeline

def run(nets: ImageNets, prompt: str, options: dict, seed: int, cancel=None) -> Iterator:
    """Progress / Partial events and one Result, on either backend."""
    from PIL import Image

    from engine.generators import Partial, Progress, Result
    from plugins.image.tokenizer import encode_prompts

    enc, neg, warnings = encode_prompts(nets.prompt_encoder, prompt or "", options.get("negative_prompt", "") or "")
    settings = SampleSettings.from_options(options)
    preview_every = max(1, settings.steps // 8)
    t0 = time.perf_counter()
    yield Progress(0, settings.steps, "encoding the prompt")
    steps = sample_steps(nets, [enc.ids], [neg.ids], settings, nets.xp.generator(seed))
    x = None
    for k, (i, n, x) in enumerate(steps):
        if k == n:  # the final images
            break
        yield Progress(i, n, f"step {i}/{n}")
        if i % preview_every == 0 and i < n:
            yield Partial(image=Image.fromarray(to_uint8(nets.xp.to_numpy(x))[0]))
        if cancel is not None:
            cancel.raise_if_cancelled()
    image = Image.fromarray(to_uint8(nets.xp.to_numpy(x))[0])
    size = nets.sample_size
    yield Result(image=image, warnings=warnings, info={
        "width": size, "height": size, "steps": settings.steps, "sampler": settings.sampler,
        "guidance": settings.guidance, "negative_prompt": options.get("negative_prompt", "") or "",
        "seconds": round(time.perf_counter() - t0, 4), "unknown_words": enc.unknown,
        "truncated_words": enc.truncated, **nets.info})
