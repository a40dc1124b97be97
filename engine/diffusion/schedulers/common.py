"""What every scheduler shares: the config, the beta schedules, numpy/torch helpers."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from engine.errors import ModelError
from engine.configs import read
from engine.samplers import SAMPLERS


@dataclass
class SchedulerConfig:
    """The training noise schedule (diffusers' config names) plus the sampler-specific options we use."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    clip_sample: bool = True  # DDPM, DDIM
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # DDIM
    steps_offset: int = 0
    timestep_spacing: str = ""  # empty: each scheduler's diffusers default

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        cfg = read(cls, d, "scheduler")
        if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ModelError(f"Beta schedule {cfg.beta_schedule!r} is not supported "
                             "(use linear, scaled_linear or squaredcos_cap_v2).")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"Prediction type {cfg.prediction_type!r} is not supported (use epsilon or v_prediction).")
        if cfg.timestep_spacing not in ("", "linspace", "leading", "trailing"):
            raise ModelError(f"Timestep spacing {cfg.timestep_spacing!r} is not supported.")
        if d.get("thresholding") or d.get("rescale_betas_zero_snr") or d.get("trained_betas") is not None:
            raise ModelError("Scheduler options thresholding, rescale_betas_zero_snr and trained_betas are not supported.")
        return cfg

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class StepOutput:
    prev_sample: Any
    pred_original_sample: Any  # the current estimate of the clean image (for previews)


def make_betas(cfg: SchedulerConfig) -> np.ndarray:
    """(T,) float32 betas, computed as diffusers does (float32 linspace; cosine ``alpha_bar`` of Nichol & Dhariwal)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    if cfg.beta_schedule == "scaled_linear":
        return np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float32) ** 2
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """(T,) float32 cumulative products of (1 - beta), i.e. alpha-bar_t."""
    # accumulated in float64 and rounded once: bit-identical to torch.cumprod on float32 (diffusers)
    return np.cumprod((1.0 - make_betas(cfg)).astype(np.float64)).astype(np.float32)


def check_steps(cfg: SchedulerConfig, num_inference_steps: int) -> int:
    """The training length T; ValueError unless 1 <= num_inference_steps <= T."""
    T = cfg.num_train_timesteps
    if not 1 <= num_inference_steps <= T:
        raise ValueError(f"steps must be between 1 and {T}")
    return T


def discrete_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """(n,) int64 descending timesteps as diffusers' DDPM/DDIM ``set_timesteps`` (default spacing "leading")."""
    T = check_steps(cfg, num_inference_steps)
    spacing = cfg.timestep_spacing or "leading"
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_inference_steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(num_inference_steps) * (T // num_inference_steps)).round()[::-1] + cfg.steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / num_inference_steps)) - 1
    return ts.astype(np.int64).copy()


def sigmas_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """(n + 1,) float32 sigma = sqrt((1 - a) / a) interpolated at ``timesteps``, then a final 0."""
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


class Scheduler:
    """What every scheduler starts with: its config, the training alphas-cumprod, and no timesteps yet."""
    init_noise_sigma = 1.0

    def __init__(self, cfg: SchedulerConfig):
        self.config = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.num_inference_steps = None

    def spacing(self, default: str) -> str:
        return self.config.timestep_spacing or default

    def start_at(self, index: int) -> None:
        """Begin sampling at step ``index`` of the schedule (img2img: the first steps are skipped)."""
        self.step_index = index

    def add_noise(self, x0, noise, index: int):
        """``x0`` noised to the level of step ``index`` (img2img's start, inpainting's kept region): in sigma
        space (x0 + sigma noise) for the samplers that work there; the variance-preserving schedulers override."""
        return x0 + noise * float(self.sigmas[index])


class DiscreteScheduler(Scheduler):
    """DDPM and DDIM: integer timesteps (all of them until ``set_timesteps``), the model input as it is."""

    def __init__(self, cfg: SchedulerConfig):
        super().__init__(cfg)
        self.timesteps = np.arange(cfg.num_train_timesteps)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = discrete_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = num_inference_steps

    def scale_model_input(self, sample, timestep):
        return sample

    def start_at(self, index: int) -> None:
        """Nothing to do: these schedulers step by the timestep's value."""

    def add_noise(self, x0, noise, index: int):
        if index >= len(self.timesteps):  # past the last step: clean, as the sigma samplers' final 0 gives (img2img
            return x0  # at a strength that leaves no step keeps the image)
        a = float(self.alphas_cumprod[int(self.timesteps[index])])
        return (a ** 0.5) * x0 + ((1 - a) ** 0.5) * noise


def clip(x, r: float):
    return x.clip(-r, r)


def randn_like(x, generator=None):
    """Standard normal noise like ``x``: torch (optional torch.Generator) or numpy (optional np.random.Generator)."""
    if isinstance(x, np.ndarray):
        rng = generator if generator is not None else np.random.default_rng()
        return rng.standard_normal(x.shape).astype(x.dtype)
    import torch
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)


def to_float(x) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def make_scheduler(name: str, cfg: SchedulerConfig):
    """The scheduler called ``name`` (one of SAMPLERS) for the model's noise schedule ``cfg``."""
    if name == "ddpm":
        from engine.diffusion.schedulers.ddpm import DDPMScheduler
        return DDPMScheduler(cfg)
    if name == "ddim":
        from engine.diffusion.schedulers.ddim import DDIMScheduler
        return DDIMScheduler(cfg)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        from engine.diffusion.schedulers.dpmpp_2m import DPMSolverMultistepScheduler
        return DPMSolverMultistepScheduler(cfg, karras=name.endswith("karras"))
    if name in ("euler", "euler_a"):
        from engine.diffusion.schedulers.euler import EulerAncestralScheduler, EulerDiscreteScheduler
        return (EulerAncestralScheduler if name == "euler_a" else EulerDiscreteScheduler)(cfg)
    raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
