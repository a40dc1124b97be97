"""One sampling loop for every diffusion family, over a small array adapter.

The loop (``sample_steps``) draws the initial noise, runs the scheduler (``engine.diffusion.schedulers``) and does
classifier-free guidance; it never touches a network. A family gives it ``denoise(x, t)``, which closes over the
family's own conditioning (text states, class labels, extra input channels). The adapter is ``TorchArrays``
(torch tensors, torch's CPU generator) or ``NumpyArrays`` (numpy arrays for onnxruntime sessions, with
``TorchRandn``, numpy's copy of torch's ``randn`` stream, so a seed gives the same picture on both backends).

Guidance (Ho & Salimans 2022): with a guidance scale g != 1 the denoiser sees one batch of 2B, the unconditional
half first, and the loop takes ``u + g (c - u)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from engine.diffusion.schedulers import make_scheduler

DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SAMPLER = 20, 1.5, "dpmpp_2m"


@dataclass
class SampleSettings:
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER

    @classmethod
    def from_options(cls, options: dict) -> "SampleSettings":
        """From a generator's resolved options (``steps``, ``guidance``, ``sampler``): the one place for defaults."""
        return cls(int(options.get("steps", DEFAULT_STEPS)), float(options.get("guidance", DEFAULT_GUIDANCE)),
                   options.get("sampler", DEFAULT_SAMPLER))


class TorchArrays:
    """torch tensors on the CPU (the networks may run elsewhere; their wrappers move the data)."""
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def generator(self, seed: int):
        return self.torch.Generator().manual_seed(int(seed))

    def noise(self, shape, generator):
        return self.torch.randn(shape, generator=generator)

    def cat(self, xs, axis: int = 0):
        return self.torch.cat(xs, dim=axis)

    def scalar(self, v: float):
        return v

    def f32(self, x):
        return x

    def clip(self, x):
        return x.clamp(-1, 1)

    def from_numpy(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a))

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def broadcast(self, x, shape):
        return x.expand(*shape)

    def like(self, a: np.ndarray, ref):
        """``a`` as a tensor on ``ref``'s device, in its dtype."""
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(ref.device, ref.dtype)


class NumpyArrays:
    """numpy float32 arrays (what onnxruntime sessions take and give)."""
    name = "numpy"

    def generator(self, seed: int):
        from engine.diffusion.torch_noise import TorchRandn

        return TorchRandn(int(seed))

    def noise(self, shape, generator):
        return np.asarray(generator.standard_normal(shape), dtype=np.float32)

    def cat(self, xs, axis: int = 0):
        return np.concatenate(xs, axis=axis)

    def scalar(self, v: float):
        return np.float32(v)

    def f32(self, x):
        return np.asarray(x, dtype=np.float32)

    def clip(self, x):
        return np.clip(x, -1, 1)

    def from_numpy(self, a: np.ndarray):
        return np.asarray(a, dtype=np.float32)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def broadcast(self, x, shape):
        return np.broadcast_to(x, shape)

    def like(self, a: np.ndarray, ref):
        return np.asarray(a, dtype=ref.dtype)


def sample_steps(xp, denoise: Callable, shape: tuple, scheduler_cfg, settings: SampleSettings, generator,
                 noise=None, start: Callable = None, after_step: Callable = None, clip: bool = True) -> Iterator:
    """Denoise a batch of ``shape`` from noise, one scheduler step per iteration.

    ``denoise(x, t)`` -> the model output for ``x`` (2B with guidance, unconditional half first; else B) at
    timestep ``t`` (a float). Yields ``(i, n, x0_estimate)`` after step i of n, then ``(n, n, x)`` with the
    result clipped to [-1, 1] (unless ``clip`` is False: latents). ``noise``: the initial standard-normal
    noise, else drawn from ``generator`` (which the stochastic samplers keep drawing from).
    ``start(scheduler) -> (x, begin)``: begin part-way through the schedule from ``x`` (img2img: an image noised
    to step ``begin``, ``scheduler.add_noise``); ``after_step(index, x) -> x`` runs after each step, ``index``
    being the next step's (inpainting: the kept region put back, noised to that step)."""
    sched = make_scheduler(settings.sampler, scheduler_cfg)
    sched.set_timesteps(settings.steps)
    guided = settings.guidance != 1.0
    begin = 0
    if start is not None:
        x, begin = start(sched)
        sched.start_at(begin)
    else:
        x = (xp.noise(shape, generator) if noise is None else noise) * xp.scalar(sched.init_noise_sigma)
    timesteps = list(sched.timesteps)[begin:]
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        xin = xp.f32(sched.scale_model_input(x, t))
        out = denoise(xp.cat([xin, xin]) if guided else xin, float(t))
        if guided:
            half = len(out) // 2
            u, c = out[:half], out[half:]
            out = u + xp.scalar(settings.guidance) * (c - u)
        step = sched.step(out, t, x, generator=generator)
        x = xp.f32(step.prev_sample)
        if after_step is not None:
            x = after_step(begin + i + 1, x)
        yield i + 1, n, step.pred_original_sample
    yield n, n, xp.clip(x) if clip else x


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (round half to even, as torch does); ModelError when
    the model computed NaN (it was saved as a black image, exit 0)."""
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        from engine.errors import ModelError

        raise ModelError("The model computed NaN (not a number) for the image: its weights or a LoRA's hold NaN, or "
                         "half precision overflowed on the GPU (try --device cpu).")
    return np.round((np.clip(x, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8).transpose(0, 2, 3, 1)
