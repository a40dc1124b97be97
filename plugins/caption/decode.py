"""Decoding loops for captioning: greedy and beam search, on numpy logits.

The loops only talk to a *runner* (``TorchCaptionRunner`` in plugins/caption/model.py, or
``OnnxCaptionRunner`` in plugins/caption/onnx.py):
``encode(pixel_values) -> state`` once per image, ``start(state, batch) -> past``,
``step(ids (B, 1) int64, past) -> (logits (B, V) float32, past)`` and ``reorder(past, index) -> past``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np


@dataclass
class Hypothesis:
    tokens: list  # generated ids, without the start token, with the end token when one was produced
    score: float  # sum of log-probabilities / length ** length_penalty
    logprob: float  # sum of log-probabilities
    finished: bool  # ended with the end token (not cut by max_new_tokens)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def prompt_ids(start) -> list:
    """The decoder's first input: a start id, or a list of ids (start token then a text prefix such as BLIP's
    "a picture of")."""
    return [int(start)] if np.isscalar(start) else [int(t) for t in start]


def greedy_tokens(runner, pixel_values, start_id, eos_id: int, max_new_tokens: int,
                  check_cancel: Optional[Callable[[], None]] = None) -> Iterator[tuple]:
    """Yield ``(token id, log-probability)`` of the most likely token at each step, up to and including
    ``eos_id``; ``check_cancel()`` runs before each step (it raises to stop). ``start_id``: an id or a prompt."""
    past = runner.start(runner.encode(pixel_values), 1)
    ids = np.array([prompt_ids(start_id)], dtype=np.int64)
    for _ in range(max_new_tokens):
        if check_cancel:
            check_cancel()
        logits, past = runner.step(ids, past)
        logp = log_softmax(logits[0])
        tok = int(np.argmax(logp))
        yield tok, float(logp[tok])
        if tok == eos_id:
            return
        ids = np.array([[tok]], dtype=np.int64)


def greedy_batch(runner, pixel_values, start_id, eos_id: int, max_new_tokens: int,
                 check_cancel: Optional[Callable[[], None]] = None) -> list:
    """Greedy captions of a batch of images (B, 3, H, W) at once, one Hypothesis each (the same tokens as
    ``greedy`` on each image alone: every row has the same prompt length, so no padding or masks are needed;
    a finished row keeps decoding the end token until all rows are done, and its extra steps are ignored)."""
    B = len(pixel_values)
    past = runner.start(runner.encode(pixel_values), B)
    ids = np.tile(np.array([prompt_ids(start_id)], dtype=np.int64), (B, 1))
    tokens = [[] for _ in range(B)]
    totals = np.zeros(B)
    live = np.ones(B, dtype=bool)
    for _ in range(max_new_tokens):
        if check_cancel:
            check_cancel()
        logits, past = runner.step(ids, past)
        logp = log_softmax(logits)
        best = np.argmax(logp, axis=-1)
        for row in np.flatnonzero(live):
            tok = int(best[row])
            tokens[row].append(tok)
            totals[row] += logp[row, tok]
            live[row] = tok != eos_id
        if not live.any():
            break
        ids = np.where(live, best, eos_id).astype(np.int64)[:, None]
    return [Hypothesis(t, float(s) / max(1, len(t)), float(s), bool(t) and t[-1] == eos_id)
            for t, s in zip(tokens, totals)]


def greedy(runner, pixel_values, start_id, eos_id: int, max_new_tokens: int,
           check_cancel: Optional[Callable[[], None]] = None) -> Hypothesis:
    """The greedy caption as one hypothesis."""
    tokens, total = [], 0.0
    for tok, logp in greedy_tokens(runner, pixel_values, start_id, eos_id, max_new_tokens, check_cancel):
        tokens.append(tok)
        total += logp
    finished = bool(tokens) and tokens[-1] == eos_id
    return Hypothesis(tokens, total / max(1, len(tokens)), total, finished)


def beam_search(runner, pixel_values, start_id, eos_id: int, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0, check_cancel: Optional[Callable[[], None]] = None) -> list:
    """The ``num_beams`` best hypotheses, best first (score = log-probability / length ** length_penalty).

    Keeps ``num_beams`` running beams; candidates ending with ``eos_id`` become finished hypotheses. Stops when
    ``num_beams`` hypotheses are finished and no running beam can still beat the worst of them, or at
    ``max_new_tokens`` (running beams then count as unfinished hypotheses).
    """
    K = num_beams
    past = runner.start(runner.encode(pixel_values), K)
    ids = np.tile(np.array([prompt_ids(start_id)], dtype=np.int64), (K, 1))
    seqs = [[] for _ in range(K)]
    sums = np.full(K, -np.inf)
    sums[0] = 0.0  # all beams start identical: only the first one may expand at step 0
    done: list[Hypothesis] = []

    def norm(total, length):
        return total / (length ** length_penalty)

    for step in range(max_new_tokens):
        if check_cancel:
            check_cancel()
        logits, past = runner.step(ids, past)
        cand = sums[:, None] + log_softmax(logits)  # (K, V)
        V = cand.shape[1]
        order = np.argsort(-cand, axis=None, kind="stable")[: 2 * K]
        length = step + 1
        new_src, new_tok, new_sum = [], [], []
        for flat in order:
            beam, tok = divmod(int(flat), V)
            total = float(cand[beam, tok])
            if not np.isfinite(total):
                break
            if tok == eos_id:
                done.append(Hypothesis(seqs[beam] + [tok], norm(total, length), total, True))
            else:
                new_src.append(beam)
                new_tok.append(tok)
                new_sum.append(total)
            if len(new_src) == K:
                break
        done.sort(key=lambda h: -h.score)
        del done[K:]
        if not new_src:
            break
        best_running = max(norm(s, length) for s in new_sum)
        if len(done) == K and done[-1].score >= best_running and length_penalty >= 0:
            break  # log-probabilities only fall; with length_penalty 1 this is the usual heuristic
        while len(new_src) < K:  # fewer live candidates than beams: pad with dead beams
            new_src.append(new_src[0])
            new_tok.append(new_tok[0])
            new_sum.append(-np.inf)
        seqs = [seqs[b] + [t] for b, t in zip(new_src, new_tok)]
        sums = np.array(new_sum)
        past = runner.reorder(past, np.array(new_src, dtype=np.int64))
        ids = np.array(new_tok, dtype=np.int64)[:, None]
    else:
        for seq, total in zip(seqs, sums):
            if np.isfinite(total):
                done.append(Hypothesis(seq, norm(total, len(seq)), float(total), False))
    done.sort(key=lambda h: -h.score)
    return done[:K]
