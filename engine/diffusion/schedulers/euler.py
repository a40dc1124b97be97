"""Euler sampling of the probability-flow ODE in sigma space (Karras et al. 2022, alg. 2 without churn),
as diffusers' EulerDiscreteScheduler (linspace spacing, linear sigma interpolation); and its ancestral variant
("Euler a"), as diffusers' EulerAncestralDiscreteScheduler: each step goes down to sigma_down and adds fresh
noise of sigma_up, drawn from the sampling generator (so a seed replays exactly)."""
from __future__ import annotations

import numpy as np

from engine.diffusion.schedulers.common import Scheduler, StepOutput, check_steps, randn_like, sigmas_at


class EulerDiscreteScheduler(Scheduler):
    def set_timesteps(self, num_inference_steps: int) -> None:
        T = check_steps(self.config, num_inference_steps)
        spacing = self.spacing("linspace")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_inference_steps, dtype=np.float32)[::-1]
        elif spacing == "leading":
            ts = (np.arange(num_inference_steps) * (T // num_inference_steps)).round()[::-1].astype(np.float32)
            ts = ts + self.config.steps_offset
        else:
            ts = np.arange(T, 0, -T / num_inference_steps).round().astype(np.float32) - 1
        self.timesteps = ts.astype(np.float32).copy()
        self.sigmas = sigmas_at(self.alphas_cumprod, self.timesteps)
        self.num_inference_steps = num_inference_steps
        self.step_index = 0

    @property
    def init_noise_sigma(self) -> float:
        s = float(self.sigmas.max())
        return s if (self.config.timestep_spacing or "linspace") in ("linspace", "trailing") else (s * s + 1) ** 0.5

    def scale_model_input(self, sample, timestep):
        """The model sees x / sqrt(sigma^2 + 1), i.e. the variance-preserving x_t."""
        sigma = float(self.sigmas[self.step_index])
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def x0(self, model_output, sample, sigma: float):
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)  # v_prediction

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        sigma = float(self.sigmas[self.step_index])
        x0 = self.x0(model_output, sample, sigma)
        prev = sample + (sample - x0) / sigma * (float(self.sigmas[self.step_index + 1]) - sigma)
        self.step_index += 1
        return StepOutput(prev, x0)


class EulerAncestralScheduler(EulerDiscreteScheduler):
    @property
    def init_noise_sigma(self) -> float:  # diffusers' ancestral scheduler: sqrt(sigma_max^2 + 1) unless linspace
        s = float(self.sigmas.max())
        return s if (self.config.timestep_spacing or "linspace") in ("linspace", "trailing") else (s * s + 1) ** 0.5

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        sigma, sigma_to = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        x0 = self.x0(model_output, sample, sigma)
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev = prev + randn_like(model_output, generator) * sigma_up
        self.step_index += 1
        return StepOutput(prev, x0)
