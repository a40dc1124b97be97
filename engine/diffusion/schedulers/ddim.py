"""DDIM (Song et al. 2021, eq. 12) with eta = 0, as diffusers' DDIMScheduler."""
from __future__ import annotations

import numpy as np

from engine.diffusion.schedulers.common import (DiscreteScheduler, SchedulerConfig, StepOutput, clip,
                                             to_float)


class DDIMScheduler(DiscreteScheduler):
    def __init__(self, cfg: SchedulerConfig):
        super().__init__(cfg)
        self.final_alpha_cumprod = 1.0 if cfg.set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (deterministic, eta = 0)."""
        t = int(to_float(timestep))
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        # coefficients in float32, as diffusers computes them
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(self.final_alpha_cumprod)
        sa, sb = float(a_t ** 0.5), float((1 - a_t) ** 0.5)
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
            eps = model_output
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if self.config.clip_sample:
            x0 = clip(x0, self.config.clip_sample_range)
        prev = float(a_prev ** 0.5) * x0 + float((1 - a_prev) ** 0.5) * eps
        return StepOutput(prev, x0)
