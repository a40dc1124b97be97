"""An onnxruntime decoder with the same ``step(input_ids, past) -> (logits, past)`` interface as the torch models.

No torch here: inputs may be numpy arrays (or anything ``np.asarray`` takes), logits come back as float32 numpy.
``past`` is an ``OnnxCache``: per layer (key, value) numpy arrays (B, n_kv, P, hs), plus the cross-attention
keys/values for encoder-decoder models, which stay fixed during decoding.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class OnnxCache:
    def __init__(self, kv: list, cross: Optional[list] = None):
        self.kv = kv  # per layer (k, v)
        self.cross = cross  # per layer (k, v) or None

    @property
    def length(self) -> int:
        return int(self.kv[0][0].shape[2]) if self.kv else 0

    @property
    def batch(self) -> int:
        return int(self.kv[0][0].shape[0])

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` positions (the arrays are views; onnxruntime returns new ones each step)."""
        self.kv = [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv]

    def reorder(self, index) -> None:
        """Select batch rows (beam search)."""
        index = np.asarray(index, dtype=np.int64)
        self.kv = [(k[index], v[index]) for k, v in self.kv]
        if self.cross is not None:
            self.cross = [(k[index], v[index]) for k, v in self.cross]


class OnnxDecoder:
    """Runs a decoder graph (``input_ids`` [, ``attention_mask``, ``position_ids``], ``past_key_values.{i}.key/value``
    [, ``cross.{i}.key/value``] -> ``logits``, ``present.{i}.key/value``)."""

    def __init__(self, session, config: dict):
        self.session = session
        self.config = config
        self.n_layers = int(config["n_layers"])
        self.n_kv = int(config["n_kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.vocab_size = int(config["vocab_size"])
        self.max_positions = int(config["max_positions"])
        self.past_names = [f"past_key_values.{i}.{t}" for i in range(self.n_layers) for t in ("key", "value")]
        self.cross_names = [f"cross.{i}.{t}" for i in range(self.n_layers) for t in ("key", "value")]
        inputs = {i.name for i in session.get_inputs()}
        self.has_cross = self.cross_names[0] in inputs
        self.has_positions = "attention_mask" in inputs  # text exports: attention_mask and position_ids
        self.output_names = ["logits"] + [f"present.{i}.{t}" for i in range(self.n_layers) for t in ("key", "value")]

    def new_cache(self, batch: int = 1, cross: Optional[list] = None) -> OnnxCache:
        empty = np.zeros((batch, self.n_kv, 0, self.head_dim), dtype=np.float32)
        return OnnxCache([(empty, empty) for _ in range(self.n_layers)], cross)

    @property
    def pads(self) -> bool:
        """Whether a left-padded batch can run (the graph takes ``attention_mask`` and ``position_ids``)."""
        return self.has_positions

    def __call__(self, input_ids, past: Optional[OnnxCache] = None, attention_mask=None, position_ids=None):
        """All-position logits (B, T, V) float32 and the extended cache. A left-padded batch passes
        ``attention_mask`` (B, P + T), 1 = a real token, and ``position_ids`` (B, T)."""
        ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
        if ids.ndim == 1:
            ids = ids[None, :]
        if past is None:
            past = self.new_cache(ids.shape[0])
        elif past.kv and past.batch != ids.shape[0]:
            if past.length == 0:
                past = self.new_cache(ids.shape[0], past.cross)
        if past.length + ids.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {past.length + ids.shape[1]} tokens exceeds the model's "
                             f"{self.max_positions} positions")
        feeds = {"input_ids": ids}
        if attention_mask is not None and not self.has_positions:
            raise ValueError("this export has no attention_mask input, so it cannot run a padded batch; export the "
                             "model again")
        if self.has_positions:  # without a mask: no padding, every slot attends, positions follow the cache
            B, T, P = ids.shape[0], ids.shape[1], past.length
            if attention_mask is None:
                feeds["attention_mask"] = np.ones((B, P + T), dtype=np.int64)
                feeds["position_ids"] = np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T)).copy()
            else:
                feeds["attention_mask"] = np.ascontiguousarray(attention_mask, dtype=np.int64)
                feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        for i, (k, v) in enumerate(past.kv):
            feeds[self.past_names[2 * i]] = k
            feeds[self.past_names[2 * i + 1]] = v
        if self.has_cross:
            if past.cross is None:
                raise ValueError("this decoder needs cross-attention keys/values (start it from an encoder state)")
            for i, (k, v) in enumerate(past.cross):
                feeds[self.cross_names[2 * i]] = k
                feeds[self.cross_names[2 * i + 1]] = v
        out = self.session.run(self.output_names, feeds)
        kv = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.n_layers)]
        return out[0], OnnxCache(kv, past.cross)

    def step(self, input_ids, past: Optional[OnnxCache] = None, attention_mask=None, position_ids=None):
        """Decoding interface: last-position logits (B, V) float32 and the updated cache."""
        logits, past = self(input_ids, past, attention_mask, position_ids)
        return np.ascontiguousarray(logits[:, -1], dtype=np.float32), past

    @staticmethod
    def reorder(past: OnnxCache, index) -> OnnxCache:
        """Keep the batch rows ``index`` of ``past`` (a batch dropping its finished rows)."""
        past.reorder(index)
        return past
