"""DPM-Solver++(2M) (Lu et al. 2022, algorithm 2, midpoint), as diffusers'
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) with its defaults
(linspace spacing, lower_order_final, final sigma 0)."""
from __future__ import annotations

import math

import numpy as np

from engine.diffusion.schedulers.common import Scheduler, StepOutput, check_steps, sigmas_at


class DPMSolverMultistepScheduler(Scheduler):
    def set_timesteps(self, num_inference_steps: int) -> None:
        T = check_steps(self.config, num_inference_steps)
        spacing = self.spacing("linspace")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_inference_steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(num_inference_steps + 1) * (T // (num_inference_steps + 1))).round()[::-1][:-1]
            ts = ts + self.config.steps_offset
        else:
            ts = np.arange(T, 0, -T / num_inference_steps).round() - 1
        self.timesteps = ts.astype(np.int64).copy()
        self.sigmas = sigmas_at(self.alphas_cumprod, self.timesteps)  # sigma = sqrt((1 - a) / a)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None, None]
        self.lower_order_nums = 0
        self.step_index = 0

    def scale_model_input(self, sample, timestep):
        return sample

    @staticmethod
    def _alpha_sigma(sigma: float):
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return alpha, sigma * alpha

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        i = self.step_index
        alpha_s0, sigma_s0 = self._alpha_sigma(float(self.sigmas[i]))
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        self.model_outputs = [self.model_outputs[1], x0]
        last = i == len(self.timesteps) - 1
        sigma_next = float(self.sigmas[i + 1])
        if sigma_next == 0.0:  # final step to sigma 0: the first-order update returns x0 exactly
            prev = x0 * 1.0
        else:
            alpha_t, sigma_t = self._alpha_sigma(sigma_next)
            h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s0) - math.log(sigma_s0))
            if self.lower_order_nums < 1 or last:
                # first order (DPM-Solver++ 1 = DDIM): x_t = (s_t / s_s) x - a_t (e^-h - 1) x0
                prev = (sigma_t / sigma_s0) * sample - (alpha_t * (math.exp(-h) - 1.0)) * x0
            else:
                # order 2 is the highest order, so diffusers' lower_order_second changes nothing here
                alpha_s1, sigma_s1 = self._alpha_sigma(float(self.sigmas[i - 1]))
                h0 = (math.log(alpha_s0) - math.log(sigma_s0)) - (math.log(alpha_s1) - math.log(sigma_s1))
                r0 = h0 / h
                m0, m1 = self.model_outputs[1], self.model_outputs[0]
                D1 = (1.0 / r0) * (m0 - m1)
                c = alpha_t * (math.exp(-h) - 1.0)
                prev = (sigma_t / sigma_s0) * sample - c * m0 - 0.5 * c * D1
        if self.lower_order_nums < 2:
            self.lower_order_nums += 1
        self.step_index += 1
        return StepOutput(prev, x0)
