"""DDPM ancestral sampling (Ho et al. 2020, eq. 6-7), as diffusers' DDPMScheduler (variance fixed_small)."""
from __future__ import annotations

import numpy as np

from engine.diffusion.schedulers.common import (DiscreteScheduler, StepOutput, clip,
                                             randn_like, to_float)


class DDPMScheduler(DiscreteScheduler):
    def _prev(self, t: int) -> int:
        idx = int(np.nonzero(self.timesteps == t)[0][0])
        return int(self.timesteps[idx + 1]) if idx + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> StepOutput:
        """x_t -> x_{t-1}: posterior mean from the predicted x0 (eq. 7) plus sqrt(beta~_t) noise."""
        t = int(to_float(timestep))
        prev_t = self._prev(t)
        # coefficients in float32, as diffusers computes them (a 1000-step run then agrees to ~1e-6)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        if self.config.prediction_type == "epsilon":
            x0 = (sample - float(b_t ** 0.5) * model_output) / float(a_t ** 0.5)
        else:  # v_prediction
            x0 = float(a_t ** 0.5) * sample - float(b_t ** 0.5) * model_output
        if self.config.clip_sample:
            x0 = clip(x0, self.config.clip_sample_range)
        prev = float(a_prev ** 0.5 * cur_beta / b_t) * x0 + float(cur_alpha ** 0.5 * b_prev / b_t) * sample
        if t > 0:
            variance = max(b_prev / b_t * cur_beta, np.float32(1e-20))
            if noise is None:
                noise = randn_like(model_output, generator)
            prev = prev + float(variance ** 0.5) * noise
        return StepOutput(prev, x0)
