"""DPM-Solver++(2M) (Lu et al. 2022, algorithm 2, midpoint), as diffusers'
DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) with its defaults
(linspace spacing, lower_order_final, final sigma 0); with ``karras=True`` the sigmas of Karras et al. 2022
(rho 7) between the schedule's ends and the timesteps read back from them (diffusers' use_karras_sigmas: "DPM++ 2M
Karras" in AUTOMATIC1111)."""
from __future__ import annotations

import math

import numpy as np

from engine.diffusion.schedulers.common import Scheduler, StepOutput, check_steps, sigmas_at


class DPMSolverMultistepScheduler(Scheduler):
    def __init__(self, cfg, karras: bool = False):
        super().__init__(cfg)
        self.karras = karras

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
        if self.karras:
            self.timesteps, self.sigmas = karras_schedule(self.alphas_cumprod, num_inference_steps,
                                                          self.config.beta_schedule != "squaredcos_cap_v2")
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None, None]
        self.lower_order_nums = 0
        self.step_index = 0

    def scale_model_input(self, sample, timestep):
        return sample

    def add_noise(self, x0, noise, index: int):
        alpha, sigma = self._alpha_sigma(float(self.sigmas[index]))
        return alpha * x0 + sigma * noise

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


def karras_schedule(alphas_cumprod: np.ndarray, n: int, rounded: bool = True) -> tuple:
    """(timesteps (n,) int64, sigmas (n + 1,) float32 ending in 0): n Karras sigmas (rho 7) from the largest to the
    smallest training sigma, and the timestep whose log-sigma each one interpolates to (rounded, or cut to an
    integer for the cosine schedule, as diffusers does)."""
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    log_sigmas = np.log(sigmas)
    rho = 7.0
    lo, hi = float(sigmas[0]) ** (1 / rho), float(sigmas[-1]) ** (1 / rho)
    karras = (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho
    ts = []
    for s in karras:
        d = np.log(max(s, 1e-10)) - log_sigmas
        low = min(int(np.cumsum(d >= 0).argmax()), len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - np.log(max(s, 1e-10))) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        ts.append((1 - w) * low + w * (low + 1))
    ts = np.array(ts)
    return ((np.round(ts) if rounded else ts).astype(np.int64),
            np.concatenate([karras, [0.0]]).astype(np.float32))
