"""The text generation loop: prompt -> tokens -> streamed text, independent of the network's backend.

The network is anything with ``step(input_ids (B, T) int64 numpy, past) -> (logits (B, V), past)`` and
``max_positions`` (``TorchDecoder`` below, or ``engine.backends.decoder.OnnxDecoder``); ``past=None`` starts a new
sequence. A decoder that can run a left-padded batch says ``pads = True``, takes ``attention_mask`` (B, P + T) and
``position_ids`` (B, T) in ``step``, and has ``reorder(past, rows) -> past``. ``NoCacheDecoder`` wraps a decoder to
recompute the whole sequence at every step (for benchmarks).

One loop (``TextPipeline._decode``) writes one prompt or a batch of them: a batch is fed left-padded with its
attention mask and each row's own positions, so each row gets the tokens it gets alone; a row that ends leaves
the batch (its cache rows are dropped).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from engine.generators import Partial, Result
from plugins.text.families import prompt_ids
from plugins.text.sampling import SamplingOptions, choose

log = logging.getLogger(__name__)


class TorchDecoder:
    """Adapts a torch model with ``step(ids, past)`` (plugins.text.llama / gpt2) to numpy in, numpy out."""

    pads = True

    def __init__(self, model, device: str = "cpu"):
        self.model = model
        self.device = device
        self.max_positions = model.max_positions

    def step(self, input_ids, past=None, attention_mask=None, position_ids=None):
        import torch

        def tensor(a):
            return None if a is None else torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)
        if attention_mask is None:
            logits, past = self.model.step(tensor(input_ids), past)
        else:
            logits, past = self.model.step(tensor(input_ids), past, attention_mask=tensor(attention_mask),
                                           position_ids=tensor(position_ids))
        return logits.float().cpu().numpy(), past

    @staticmethod
    def reorder(past, rows):
        past.reorder(list(rows))
        return past


class NoCacheDecoder:
    """Feeds the whole sequence at every step (no KV cache); its ``past`` is the ids so far. One row at a time."""

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


@dataclass
class _Row:
    """One prompt as the loop writes it."""
    index: int  # its place in the caller's list
    req: TextRequest
    ids: list  # the prompt's ids and the ids written so far
    warnings: list
    eos: set = field(default_factory=set)
    prompt_tokens: int = 0
    fed: int = 0  # how many of its ids the decoder's cache holds (its next position)
    new_ids: list = field(default_factory=list)
    emitted: str = ""  # streamed so far
    text: str = ""  # the answer cut at a stop string
    stopped_by: Optional[str] = None

    def __post_init__(self):
        self.prompt_tokens = len(self.ids)
        self.rng = np.random.default_rng(self.req.seed)


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
    """Tokenizer + decoder + sampling. ``run`` yields ``Partial(text=...)`` events and one ``Result``;
    ``run_batch`` does the same for several prompts at once, each event with its prompt's index."""

    def __init__(self, decoder, tokenizer, bos_token_id: Optional[int] = None, eos_token_ids=(),
                 add_bos: bool = True):
        self.decoder = decoder
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.bos = bos_token_id
        self.eos = set(eos_token_ids)
        self.add_bos = add_bos

    def encode_prompt(self, prompt: str) -> list:
        ids = prompt_ids(self.tokenizer, prompt, self.bos, self.add_bos)
        if not ids:
            raise ValueError("empty prompt and no BOS token")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _fit(self, prompt: str, req: TextRequest, warnings: list) -> list:
        """The prompt's ids, cut from the front to leave room to write in the model's context."""
        if not (prompt or "").strip():  # said as the image generator says it: a text from nothing is no mistake
            warnings.append("The prompt is empty, so the text starts from nothing (whatever the model likes).")
        ids = self.encode_prompt(prompt)
        context = self.decoder.max_positions
        limit = max(1, context - min(req.max_new_tokens, context // 4))
        if len(ids) > limit:
            dropped = len(ids) - limit
            warnings.append(f"The prompt was {len(ids)} tokens, too long for the model's context of {context} "
                            f"tokens with room to write; its first {dropped} tokens were left out.")
            log.warning(warnings[-1])
            ids = ids[-limit:]
        return ids

    def run(self, prompt: str, req: TextRequest, cancel=None) -> Iterator:
        warnings: list = []
        ids = self._fit(prompt, req, warnings)
        return self.run_ids(ids, req, cancel, warnings=warnings)

    def run_batch(self, prompts: list, reqs: list, cancel=None, batch_size: int = 0) -> Iterator:
        """``(index, event)`` for the prompts, each with its own request (seed), in left-padded batches of
        ``batch_size`` (0: all at once); one at a time when the decoder cannot run a padded batch."""
        rows = []
        for i, (prompt, req) in enumerate(zip(prompts, reqs)):
            warnings: list = []
            rows.append(_Row(i, req, self._fit(prompt, req, warnings), warnings, self.eos | set(req.stop_ids)))
        size = max(1, batch_size or len(rows)) if getattr(self.decoder, "pads", False) else 1
        for start in range(0, len(rows), size):
            yield from self._decode(rows[start:start + size], cancel)

    def run_ids(self, ids: list, req: TextRequest, cancel=None, prefix: Optional[PrefixState] = None,
                warnings: Optional[list] = None) -> Iterator:
        """Generate after the prompt token ids ``ids`` (which fit the context). ``prefix``: the cache of the last
        generation, reused for the ids this prompt shares with it, and given this one's when it ends (finished,
        stopped or cancelled: the ids of the last step that completed and their cache)."""
        reused, past = prefix.take(ids) if prefix is not None else (0, None)
        latest: dict = {}  # updated after every decoder step that completes
        row = _Row(0, req, list(ids), list(warnings or []), self.eos | set(req.stop_ids))
        try:
            for _, event in self._decode([row], cancel, reused, past, latest if prefix is not None else None):
                yield event
        finally:
            if prefix is not None and latest:
                prefix.put(latest["ids"], latest["past"])

    def _feed(self, seqs: list, past, masked: bool):
        """(logits, past, mask): the decoder after reading ``seqs``, one id list per row. ``masked``: left-padded
        to the longest with ``mask`` (B, slots) saying which slots are real, and each row's positions from 0;
        else one row, read after ``past``."""
        if not masked:
            logits, past = self.decoder.step(np.array(seqs, dtype=np.int64), past)
            return logits, past, None
        T = max(len(s) for s in seqs)
        ids, mask, pos = (np.zeros((len(seqs), T), dtype=np.int64) for _ in range(3))
        for i, s in enumerate(seqs):
            ids[i, T - len(s):], mask[i, T - len(s):], pos[i, T - len(s):] = s, 1, np.arange(len(s))
        logits, past = self.decoder.step(ids, None, attention_mask=mask, position_ids=pos)
        return logits, past, mask

    def _decode(self, rows: list, cancel, reused: int = 0, past=None, latest: Optional[dict] = None) -> Iterator:
        """The loop: ``(row.index, event)`` for every row. One row reads its prompt after ``reused`` ids already
        in ``past``; several rows go as a left-padded batch. ``latest`` (one row) gets the ids and cache of
        every completed step."""
        context = self.decoder.max_positions
        masked, size = len(rows) > 1, len(rows)
        t0 = time.perf_counter()
        logits, past, mask = self._feed([rows[0].ids[reused:]] if not masked else [r.ids for r in rows],
                                        past, masked)
        for r in rows:
            r.fed = len(r.ids)
        slots = mask.shape[1] if masked else rows[0].fed  # positions the cache holds, padding included
        if latest is not None:
            latest.update(ids=list(rows[0].ids), past=past)
        t_first = time.perf_counter()
        while rows:
            if cancel is not None:
                cancel.raise_if_cancelled()
            going = []
            for k, r in enumerate(rows):
                finished = yield from self._advance(r, logits[k], context)
                if finished:
                    yield from self._finish(r, t0, t_first, size, reused if latest is not None else None)
                else:
                    going.append(k)
            if not going:
                break
            if len(going) < len(rows):  # finished rows leave the batch
                past = self.decoder.reorder(past, going)
                rows, mask = [rows[k] for k in going], mask[going]
            if slots + 1 > context:  # the cache is full: start again from a window of each row's recent tokens
                keep = [r.ids[-(context * 3 // 4):] if r.fed + 1 > context else r.ids[-(r.fed + 1):] for r in rows]
                logits, past, mask = self._feed(keep, None, masked)
                for r, ids in zip(rows, keep):
                    r.fed = len(ids)
                slots = mask.shape[1] if masked else rows[0].fed
            else:
                toks = np.array([[r.ids[-1]] for r in rows], dtype=np.int64)
                if masked:
                    mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
                    pos = np.array([[r.fed] for r in rows], dtype=np.int64)
                    logits, past = self.decoder.step(toks, past, attention_mask=mask, position_ids=pos)
                else:
                    logits, past = self.decoder.step(toks, past)
                for r in rows:
                    r.fed += 1
                slots += 1
            if latest is not None:
                latest.update(ids=rows[0].ids[-rows[0].fed:], past=past)

    def _advance(self, r: _Row, logits, context: int):
        """Choose row ``r``'s next token and stream what is settled; returns True when the row has ended."""
        req = r.req
        tok = choose(logits, r.ids, req.sampling, r.rng, r.new_ids)
        r.new_ids.append(tok)
        r.ids.append(tok)
        if tok in r.eos:
            r.stopped_by = "eos"
            return True
        text = self.decode(r.new_ids)
        if req.stop:
            start = max(0, len(r.emitted) - max(len(x) for x in req.stop))
            hits = [i for i in (text.find(s, start) for s in req.stop) if i >= 0]
            if hits:
                r.text, r.stopped_by = text[:min(hits)], "stop"
                return True
        # stream what is settled: no half UTF-8 character, nothing that may begin a stop string
        ready = text.rstrip("\ufffd")
        if req.stop:
            ready = ready[:len(ready) - _held_back(ready, req.stop)]
        if len(ready) > len(r.emitted) and ready.startswith(r.emitted):
            yield r.index, Partial(text=ready[len(r.emitted):])
            r.emitted = ready
        if len(r.new_ids) == req.max_new_tokens:
            return True
        if r.fed + 1 > context and not req.slide:
            r.stopped_by = "context"
            r.warnings.append(f"The answer reached the end of the model's context of {context} tokens and "
                              "stopped there.")
            return True
        return False

    def _finish(self, r: _Row, t0: float, t_first: float, size: int, reused: Optional[int]) -> Iterator:
        text = r.text if r.stopped_by == "stop" else self.decode(r.new_ids)
        if len(text) > len(r.emitted) and text.startswith(r.emitted):
            yield r.index, Partial(text=text[len(r.emitted):])
        t_end = time.perf_counter()
        n = len(r.new_ids)
        info = {"prompt_tokens": r.prompt_tokens, "new_tokens": n,
                "tokens_per_second": round(n / max(t_end - t0, 1e-9), 2),
                "prefill_seconds": round(t_first - t0, 4), "seconds": round(t_end - t0, 4),
                "stopped_by": r.stopped_by or "max_new_tokens"}
        if size > 1:
            info["batch_size"] = size
        if reused is not None:
            info["reused_tokens"] = reused
        yield r.index, Result(text=text, token_ids=r.new_ids, warnings=r.warnings, info=info)
