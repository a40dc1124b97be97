"""Tiled VAE decoding on either backend: ``decode`` runs on overlapping tiles of the latents and the seams are
blended linearly (diffusers' ``AutoencoderKL.tiled_decode``, same tiles and blending), so a large image decodes in
the memory of one tile. Arrays are torch tensors or numpy arrays through the loop's adapter (``engine.diffusion``).
"""
from __future__ import annotations

import numpy as np


def decode_tiled(xp, decode, z, tile: int, factor: int, overlap: float = 0.25):
    """``decode(z)`` (B, C, h, w) -> (B, 3, h*factor, w*factor), in tiles of ``tile`` latents."""
    if z.shape[-1] <= tile and z.shape[-2] <= tile:
        return decode(z)
    step = int(tile * (1 - overlap))
    out_tile = tile * factor
    blend = int(out_tile * overlap)
    keep = out_tile - blend
    rows = [[decode(z[:, :, i:i + tile, j:j + tile]) for j in range(0, z.shape[3], step)]
            for i in range(0, z.shape[2], step)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend(xp, rows[i - 1][j], t, blend, dim=2)
            if j > 0:
                t = _blend(xp, row[j - 1], t, blend, dim=3)
            row[j] = t  # the next row and the next tile blend with this tile as blended
            parts.append(t[:, :, :keep, :keep])
        out_rows.append(xp.cat(parts, axis=3))
    return xp.cat(out_rows, axis=2)


def _blend(xp, a, b, extent: int, dim: int):
    """``b`` with its first ``extent`` rows (dim 2) or columns (dim 3) faded in from the end of ``a``."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = xp.like(np.arange(extent, dtype=np.float32).reshape(shape) / np.float32(extent), b)

    def part(x, start, stop):
        index = [slice(None)] * 4
        index[dim] = slice(start, stop)
        return x[tuple(index)]

    head = part(a, a.shape[dim] - extent, a.shape[dim]) * (1 - w) + part(b, 0, extent) * w
    return xp.cat([head, part(b, extent, b.shape[dim])], axis=dim)
