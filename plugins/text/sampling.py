"""Choosing the next token from logits: repetition, presence and frequency penalties, temperature, top-k, top-p.
numpy only.

Every function takes a 1-D float32 numpy array of logits (one row; torch logits go through ``.numpy()``), so the
same code serves the torch and onnxruntime backends. Randomness comes from a ``numpy.random.Generator`` seeded
with the request's seed, so a seed reproduces a generation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ModelError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # 0 = off

    @classmethod
    def from_options(cls, options: dict) -> "SamplingOptions":
        return cls(temperature=float(options.get("temperature", 0.8)), top_k=int(options.get("top_k", 0)),
                   top_p=float(options.get("top_p", 1.0)),
                   repetition_penalty=float(options.get("repetition_penalty", 1.0)),
                   presence_penalty=float(options.get("presence_penalty", 0.0)),
                   frequency_penalty=float(options.get("frequency_penalty", 0.0)))


def apply_repetition_penalty(logits: np.ndarray, previous, penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers): a seen token's logit is divided by ``penalty`` if positive, else
    multiplied."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    ids = np.unique(np.asarray(previous, dtype=np.int64))
    ids = ids[ids < logits.shape[-1]]
    seen = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_presence_frequency(logits: np.ndarray, generated, presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties over the tokens written so far (not the prompt): a written token's logit is lowered by
    ``presence`` once and by ``frequency`` for each time it was written (negative values favour them)."""
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep]
    logits = logits.copy()
    logits[ids] -= (presence + frequency * counts).astype(logits.dtype)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties at the threshold kept), the rest -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -k)[-k]
    return np.where(logits < threshold, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    p = np.exp(z)
    return p / p.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits)[order]
    cumulative = np.cumsum(probs)
    keep = int(np.searchsorted(cumulative, p) + 1)  # tokens up to and including the one that reaches p
    out = np.full_like(logits, -np.inf)
    out[order[:keep]] = logits[order[:keep]]
    return out


def choose(logits, previous, opts: SamplingOptions, rng: np.random.Generator, generated=()) -> int:
    """The next token id. ``previous``: ids so far (prompt and generated) for the repetition penalty;
    ``generated``: the ids written so far, for the presence and frequency penalties."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)
    if np.isnan(logits).any() or not np.isfinite(logits).any():
        raise ModelError("The model computed NaN scores for the next token: its weights or config hold NaN or "
                         "overflow (import it again, or check its files).")
    logits = apply_repetition_penalty(logits, previous, opts.repetition_penalty)
    logits = apply_presence_frequency(logits, generated, opts.presence_penalty, opts.frequency_penalty)
    if opts.temperature <= 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = logits / np.float32(opts.temperature)
    if not np.isfinite(scaled[np.isfinite(logits)]).all():  # a temperature so small (1e-300) the scores overflow: its limit,
        return int(np.argmax(logits))  # greedy (it gave NaN probabilities and token 0)
    logits = scaled
    logits = top_k_filter(logits, opts.top_k)
    logits = top_p_filter(logits, opts.top_p)
    probs = softmax(logits)
    u = rng.random()
    return int(min(np.searchsorted(np.cumsum(probs), u, side="right"), len(probs) - 1))
