"""The noise ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` draws on the CPU, in numpy.

The ONNX backend runs without torch, yet a seed should give the same picture on both backends. PyTorch's CPU
generator is a Mersenne Twister seeded with the low 32 bits of the seed (numpy's legacy MT19937 seeding is the
same algorithm); ``randn`` for 16 or more values fills the tensor with 24-bit uniforms, then turns each block of
16 into normals with Box-Muller (``u1 = 1 - a[j]``, ``u2 = a[j + 8]`` for j < 8), and redraws the last 16
values when the size is not a multiple of 16. ``TorchRandn`` repeats that, so successive draws follow torch's
stream too (the DDPM sampler draws once per step). Agreement: within 1.5e-6 (PyTorch computes the logarithm and
trigonometry in float32 with SIMD approximations; this in float64); tests/test_image_pipeline.py checks it.
"""
from __future__ import annotations

import numpy as np


class TorchRandn:
    def __init__(self, seed: int):
        self._bits = np.random.MT19937(0)
        self._bits._legacy_seeding(int(seed) & 0xFFFFFFFF)

    def _uniform(self, n: int) -> np.ndarray:
        raw = self._bits.random_raw(n).astype(np.uint64)
        return ((raw & 0xFFFFFF).astype(np.float64) / float(1 << 24)).astype(np.float32)

    @staticmethod
    def _box_muller(blocks: np.ndarray) -> np.ndarray:  # (k, 16) uniforms -> (k, 16) normals
        r = np.sqrt(-2.0 * np.log((np.float32(1) - blocks[:, :8]).astype(np.float64)))
        theta = 2.0 * np.pi * blocks[:, 8:].astype(np.float64)
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1).astype(np.float32)

    def standard_normal(self, shape, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape))
        if n < 16:
            raise ValueError("TorchRandn covers tensors of 16 or more values (torch uses another method below)")
        data = self._uniform(n)
        full = n - n % 16
        data[:full] = self._box_muller(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:
            data[n - 16:] = self._box_muller(self._uniform(16)[None, :])[0]
        return data.reshape(shape).astype(dtype, copy=False)
