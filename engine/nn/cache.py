"""The KV-cache protocol of every decoder, and its torch implementations.

A cache holds, per layer, the keys and values of the positions seen so far:

- ``cache.length``: how many positions are cached. It is read off what is stored (layer 0), never set by a
  model: a model reads it once, before its layers run, as the position of its first new token.
- ``cache.update(layer, k, v) -> (k_all, v_all)``: append this call's keys and values (B, n_kv, T, hs) to
  ``layer`` and return all of that layer's keys and values so far. The only way a model changes a cache.
- ``cache.cross``: per layer the (k, v) of an encoder's states for cross-attention, set once by whoever
  encodes (``model.cross_kv``), or None.
- ``cache.reorder(index)``: keep the batch rows ``index`` (beam search, a batch dropping its finished rows).
- ``cache.truncate(n)``: keep the first ``n`` positions (a chat turn reusing the prefix it shares with the last
  conversation); the next ``update`` writes after them.

``KVCache`` (below) preallocates buffers that grow by doubling, so a decode step writes one column instead of
re-concatenating the history. ``TraceCache`` is the form an export traces: the past arrives as graph inputs,
``update`` concatenates and records the presents (graph outputs). engine/backends/decoder.py's ``OnnxCache``
holds the numpy arrays onnxruntime returns and reports ``length`` and ``reorder`` the same way.
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
        self.lengths = [0] * n_layers  # positions stored per layer
        self.cross: list | None = None  # per layer: (k, v) each (B, nh, S_enc, hs), for encoder-decoder models

    @property
    def length(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, n_kv, T, hs) after the layer's stored positions; return all of them so far (views)."""
        start, T = self.lengths[layer], k.shape[2]
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
        self.lengths[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions of every layer; later updates overwrite the rest of the buffers."""
        self.lengths = [min(length, n) for length in self.lengths]

    def reorder(self, index) -> None:
        """Select batch rows (beam search; a batch dropping its finished rows): every buffer becomes ``buf[index]``.
        ``index``: a tensor or a list of row numbers."""
        if not isinstance(index, torch.Tensor):
            ref = next((t for t in self.k if t is not None), None)
            index = torch.as_tensor(index, dtype=torch.long, device=None if ref is None else ref.device)
        self.k = [None if t is None else t.index_select(0, index) for t in self.k]
        self.v = [None if t is None else t.index_select(0, index) for t in self.v]
        if self.cross is not None:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]


class TraceCache:
    """The cache an export traces: ``past`` (per layer (k, v), (B, n_kv, P, hs)) are graph inputs, ``update``
    concatenates onto them and records the presents (graph outputs); ``length`` is P, read off the input."""

    def __init__(self, past, cross=None):
        self.past = list(past)
        self.present = [None] * len(self.past)
        self.cross = cross

    @property
    def length(self):
        return self.past[0][0].shape[2]

    def update(self, layer, k, v):
        pk, pv = self.past[layer]
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.present[layer] = (k, v)
        return k, v


def causal_mask(T: int, past: int, device) -> torch.Tensor | None:
    """Boolean (T, past+T) mask, True where attention is allowed; None when SDPA's own is_causal suffices."""
    if T == 1:
        return None
    q = torch.arange(T, device=device)[:, None] + past
    kpos = torch.arange(past + T, device=device)[None, :]
    return kpos <= q


def padded_mask(T: int, past: int, device, attention_mask) -> torch.Tensor:
    """Boolean (B, 1, T, past + T) mask of a left-padded batch for the eager (SDPA) forms, True where attention is
    allowed: query t (slot ``past + t``) sees the real tokens (``attention_mask`` (B, past + T), 1 = real, 0 =
    padding) up to its own slot. A padding query sees only itself, so no row is empty: an empty row is NaN in
    SDPA, and a NaN key or value of a padding slot would reach the real rows (0 x NaN) in any dtype."""
    slots = torch.arange(past + T, device=device)
    query = (torch.arange(T, device=device) + past)[:, None]
    real = attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # (B, 1, P + T)
    return (((slots[None, :] <= query)[None] & real) | (slots[None, :] == query)[None])[:, None]


def additive_mask(T: int, past, dtype, device, attention_mask=None) -> torch.Tensor:
    """The export forms' additive attention mask: 0 where allowed, the dtype's lowest value elsewhere (not -inf,
    so a row with nothing to attend to, such as a left-padding position, stays finite). Query t sits at slot
    ``past + t``; it may see slots up to its own. Without ``attention_mask``: (T, past + T). With it ((B, past + T),
    1 = a real token, 0 = padding, as onnxruntime-genai and Optimum pass it): (B, 1, T, past + T)."""
    slots = torch.arange(past + T, device=device)
    allowed = slots[None, :] <= (torch.arange(T, device=device) + past)[:, None]  # (T, P + T)
    if attention_mask is not None:
        allowed = (allowed[None] & attention_mask[:, None, :].to(torch.bool))[:, None]  # (B, 1, T, P + T)
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
