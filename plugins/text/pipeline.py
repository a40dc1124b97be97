"""The text generation loop: prompt -> tokens -> streamed text, independent of the network's backend.

The network is anything with ``step(input_ids (1, T) int64 numpy, past) -> (logits (1, V), past)`` and
``max_positions`` (``TorchDecoder`` below, or ``engine.backends.decoder.OnnxDecoder``); ``past=None`` starts a new
sequence. ``NoCacheDecoder`` wraps a decoder to recompute the whole sequence at every step (for benchmarks).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from engine.generators import Partial, Result
from plugins.text.sampling import SamplingOptions, choose

log = logging.getLogger(__name__)


class TorchDecoder:
    """Adapts a torch model with ``step(ids, past)`` (plugins.text.llama / gpt2) to numpy in, numpy out."""

    def __init__(self, model, device: str = "cpu"):
        self.model = model
        self.device = device
        self.max_positions = model.max_positions

    def step(self, input_ids, past=None):
        import torch

        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=self.device)
        logits, past = self.model.step(ids, past)
        return logits.float().cpu().numpy(), past


class NoCacheDecoder:
    """Feeds the whole sequence at every step (no KV cache); its ``past`` is the ids so far."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.max_positions = decoder.max_positions

    def step(self, input_ids, past=None):
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids if past is None else np.concatenate([past, ids], axis=1)
        logits, _ = self.decoder.step(ids, None)
        return logits, ids


@dataclass
class TextRequest:
    max_new_tokens: int = 200
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: tuple = ()  # stop strings
    seed: int = 0
    stop_ids: tuple = ()  # token ids that end the answer besides EOS (a chat template's end of turn)
    slide: bool = True  # when the context fills: slide the window (text) or stop (chat: nothing is cut silently)


@dataclass
class PrefixState:
    """The token ids a decoder's cache holds and that cache, kept between generations (a conversation's turns):
    a new prompt that starts with the same ids reuses their keys and values instead of reading them again."""
    ids: list = field(default_factory=list)
    past: object = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, ids: list):
        """(reused count, past truncated to it) for a new prompt ``ids``; (0, None) when nothing is shared.
        At least one id is always left to feed (its logits start the answer). The cache is handed over: until
        the generation puts its own back, a second one (another thread) starts from scratch."""
        with self.lock:
            n = 0
            limit = min(len(self.ids), len(ids) - 1)
            while n < limit and self.ids[n] == ids[n]:
                n += 1
            if n == 0 or self.past is None:
                return 0, None
            past, self.past, self.ids = self.past, None, []
        return n, truncate_past(past, n)

    def put(self, ids: list, past) -> None:
        """Keep ``past``, the cache of ``ids``, for the next generation."""
        with self.lock:
            self.ids, self.past = list(ids), past


def truncate_past(past, n: int):
    """A decoder cache cut back to its first ``n`` positions: the cache protocol's ``truncate`` (engine/nn/cache.py),
    or NoCacheDecoder's ids."""
    if isinstance(past, np.ndarray):
        return past[:, :n]
    past.truncate(n)
    return past


def parse_stop(value: str) -> tuple:
    """The ``stop`` option: strings separated by ``|``; ``\\n``, ``\\t``, ``\\|`` and ``\\\\`` are escapes."""
    if not value:
        return ()
    parts, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur += {"n": "\n", "t": "\t", "|": "|", "\\": "\\"}.get(value[i + 1], "\\" + value[i + 1])
            i += 2
            continue
        if c == "|":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return tuple(p for p in parts if p)


def _held_back(text: str, stops: tuple) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not to be streamed yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class TextPipeline:
    """Tokenizer + decoder + sampling. ``run`` yields ``Partial(text=...)`` events and one ``Result``."""

    def __init__(self, decoder, tokenizer, bos_token_id: Optional[int] = None, eos_token_ids=(),
                 add_bos: bool = True):
        self.decoder = decoder
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.bos = bos_token_id
        self.eos = set(eos_token_ids)
        self.add_bos = add_bos

    def encode_prompt(self, prompt: str) -> list:
        ids = self.tokenizer.encode(prompt or "").ids
        if self.bos is not None and (not ids or (self.add_bos and ids[0] != self.bos)):
            ids = [self.bos] + ids
        if not ids:
            raise ValueError("empty prompt and no BOS token")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def run(self, prompt: str, req: TextRequest, cancel=None) -> Iterator:
        warnings = []
        ids = self.encode_prompt(prompt)
        context = self.decoder.max_positions
        limit = max(1, context - min(req.max_new_tokens, context // 4))
        if len(ids) > limit:
            dropped = len(ids) - limit
            warnings.append(f"The prompt was {len(ids)} tokens, too long for the model's context of {context} "
                            f"tokens with room to write; its first {dropped} tokens were left out.")
            log.warning(warnings[-1])
            ids = ids[-limit:]
        return self.run_ids(ids, req, cancel, warnings=warnings)

    def run_ids(self, ids: list, req: TextRequest, cancel=None, prefix: Optional[PrefixState] = None,
                warnings: Optional[list] = None) -> Iterator:
        """Generate after the prompt token ids ``ids`` (which fit the context). ``prefix``: the cache of the last
        generation, reused for the ids this prompt shares with it, and given this one's when it ends (finished,
        stopped or cancelled: the ids of the last step that completed and their cache)."""
        reused, past = prefix.take(ids) if prefix is not None else (0, None)
        latest: dict = {}  # updated after every decoder step that completes
        try:
            yield from self._decode(ids, req, cancel, reused, past, latest, warnings, prefix is not None)
        finally:
            if prefix is not None and latest:
                prefix.put(latest["ids"], latest["past"])

    def _decode(self, ids, req, cancel, reused, past, latest, warnings, report_reuse) -> Iterator:
        warnings = list(warnings or [])
        context = self.decoder.max_positions
        prompt_tokens = len(ids)
        eos = self.eos | set(req.stop_ids)
        rng = np.random.default_rng(req.seed)
        all_ids = list(ids)
        new_ids: list = []
        emitted = ""
        text = ""
        stopped_by = None
        t0 = time.perf_counter()
        longest_stop = max((len(x) for x in req.stop), default=0)
        logits, past = self.decoder.step(np.array([ids[reused:]], dtype=np.int64), past)
        fed = len(ids)
        latest.update(ids=list(ids), past=past)
        t_first = time.perf_counter()
        for _ in range(req.max_new_tokens):
            if cancel is not None:
                cancel.raise_if_cancelled()
            tok = choose(logits[0], all_ids, req.sampling, rng)
            new_ids.append(tok)
            all_ids.append(tok)
            if tok in eos:
                stopped_by = "eos"
                break
            text = self.decode(new_ids)
            if req.stop:
                start = max(0, len(emitted) - longest_stop)
                hits = [i for i in (text.find(s, start) for s in req.stop) if i >= 0]
                if hits:
                    text = text[:min(hits)]
                    stopped_by = "stop"
                    break
            # stream what is settled: no half UTF-8 character, nothing that may begin a stop string
            ready = text.rstrip("\ufffd")
            if req.stop:
                ready = ready[:len(ready) - _held_back(ready, req.stop)]
            if len(ready) > len(emitted) and ready.startswith(emitted):
                yield Partial(text=ready[len(emitted):])
                emitted = ready
            if len(new_ids) == req.max_new_tokens:
                break
            if fed + 1 > context and not req.slide:
                stopped_by = "context"
                warnings.append(f"The answer reached the end of the model's context of {context} tokens and "
                                "stopped there.")
                break
            if fed + 1 > context:  # the context is full: slide the window and re-read the recent tokens
                keep = all_ids[-(context * 3 // 4):]
                logits, past = self.decoder.step(np.array([keep], dtype=np.int64), None)
                fed = len(keep)
            else:
                logits, past = self.decoder.step(np.array([[tok]], dtype=np.int64), past)
                fed += 1
            latest.update(ids=all_ids[-fed:], past=past)
        if stopped_by != "stop":
            text = self.decode(new_ids)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield Partial(text=text[len(emitted):])
        t_end = time.perf_counter()
        n = len(new_ids)
        info = {"prompt_tokens": prompt_tokens, "new_tokens": n,
                "tokens_per_second": round(n / max(t_end - t0, 1e-9), 2),
                "prefill_seconds": round(t_first - t0, 4), "seconds": round(t_end - t0, 4),
                "stopped_by": stopped_by or "max_new_tokens"}
        if report_reuse:
            info["reused_tokens"] = reused
        yield Result(text=text, token_ids=new_ids, warnings=warnings, info=info)
