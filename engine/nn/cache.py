"""A key/value cache for decoder self-attention (and the cross-attention K/V computed once per prompt).

Buffers are preallocated and grow by doubling, so a decode step writes one column instead of re-concatenating
the whole history. ``length`` is the number of positions already cached; the model advances it after each call.
"""
from __future__ import annotations

import torch


def no_cudnn_attention_on_cuda(device) -> None:
    """Turn off PyTorch's cuDNN attention when decoding on CUDA. It builds an execution plan for every new key
    length, so each decode step paid ~40 ms until that length was seen once (built-in model on an H100: 22 tok/s
    with it, 356 tok/s without; benchmarks/gpu_check.py). Flash and memory-efficient attention stay on."""
    if str(device).startswith("cuda"):
        import torch
        torch.backends.cuda.enable_cudnn_sdp(False)


class KVCache:
    def __init__(self, n_layers: int):
        self.k: list = [None] * n_layers  # per layer: (B, n_kv, capacity, hs)
        self.v: list = [None] * n_layers
        self.cross: list | None = None  # per layer: (k, v) each (B, nh, S_enc, hs), for encoder-decoder models
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, n_kv, T, hs) at position ``length``; return all keys and values so far (views)."""
        start, T = self.length, k.shape[2]
        end = start + T
        buf_k = self.k[layer]
        if buf_k is None or buf_k.shape[2] < end or buf_k.shape[0] != k.shape[0]:
            cap = max(end, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
            B, H, _, D = k.shape
            new_k = k.new_empty(B, H, cap, D)
            new_v = v.new_empty(B, H, cap, D)
            if buf_k is not None and start:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (for beam search): every buffer becomes ``buf[index]``."""
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        if self.cross is not None:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]


def causal_mask(T: int, past: int, device) -> torch.Tensor | None:
    """Boolean (T, past+T) mask, True where attention is allowed; None when SDPA's own is_causal suffices."""
    if T == 1:
        return None
    q = torch.arange(T, device=device)[:, None] + past
    kpos = torch.arange(past + T, device=device)[None, :]
    return kpos <= q
