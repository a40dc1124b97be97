"""Euler sampling of the probability-flow ODE in sigma space (Karras et al. 2022, alg. 2 without churn),
as diffusers' EulerDiscreteScheduler (linspace spacing, linear sigma interpolation)."""
from __future__ import annotations

import numpy as np

from engine.diffusion.schedulers.common import Scheduler, StepOutput, check_steps, sigmas_at


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

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        sigma = float(self.sigmas[self.step_index])
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (float(self.sigmas[self.step_index + 1]) - sigma)
        self.step_index += 1
        return StepOutput(prev, x0)
