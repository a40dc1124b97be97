"""Prompts as AUTOMATIC1111 users write them: emphasis and prompts longer than the text encoder's 77 tokens.

Emphasis: ``(word)`` multiplies the word's attention weight by 1.1, ``((word))`` by 1.21, ``[word]`` divides it
by 1.1, ``(word:1.3)`` sets a factor; ``\\(`` and ``\\)`` are literal brackets; an unclosed bracket applies to the
end of the prompt; ``BREAK`` starts a new chunk. Long prompts: the tokens go into chunks of 75 (each then framed by
the start and end tokens, 77 in all) and the chunks' encodings are joined along the sequence axis; a chunk that
would end just after a comma (within 20 tokens) ends at the comma instead. Each chunk's hidden states are multiplied
by the tokens' weights and then rescaled so that their mean is what it was. The negative prompt is treated the same
way, and the shorter of the two is padded with encodings of the empty prompt so that both have the same length.

A prompt without brackets and within 75 tokens encodes exactly as diffusers encodes it.
"""
from __future__ import annotations

import re

import numpy as np

from engine.errors import UsageError

CHUNK = 75
COMMA_BACKTRACK = 20
_ATTENTION = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list:
    """[[text, weight], ...] for a prompt with A1111 emphasis; a BREAK is ["BREAK", -1]. Neighbouring pieces of
    equal weight are merged."""
    res: list = []
    round_open, square_open = [], []

    def multiply(start: int, factor: float) -> None:
        for piece in res[start:]:
            piece[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise UsageError(f"The prompt weight {m.group(0)!r} is not a number; write a weight as "
                                 "(word:1.2).") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def chunks(text: str, tokenize, bos: int, eos: int, pad: int, comma: int) -> tuple:
    """([ids of 77], [weights of 77]) per chunk, and the number of prompt tokens: ``tokenize(text)`` gives ids
    without start and end tokens; after the first end token of a chunk come ``pad`` ids (SD 2.x pads with 0)."""
    out_ids, out_w = [], []
    ids, ws, last_comma, count = [], [], -1, 0

    def close(last: bool = False):
        nonlocal ids, ws, last_comma, count
        count += len(ids) if last else CHUNK
        fill = CHUNK - len(ids)
        row = [bos] + ids + [eos] + [pad] * fill
        out_ids.append(row)
        out_w.append([1.0] + ws + [1.0] * (fill + 1))
        ids, ws, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenize(piece):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved, moved_w = ids[cut:], ws[cut:]
                ids, ws = ids[:cut], ws[:cut]
                close()
                ids, ws = moved, moved_w
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            ws.append(weight)
    if ids or not out_ids:
        close(last=True)
    return out_ids, out_w, count


def weighted(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A chunk's hidden states (1, 77, D) times its token weights, rescaled to the original mean."""
    mean = hidden.mean()
    z = hidden * weights[None, :, None]
    new = z.mean()
    return z * (mean / new) if new != 0 else z


def encode_prompts(positive: str, negative: str, tokenizer, encode) -> tuple:
    """(positive, negative) hidden states (1, 77 k, D), the same k for both, and the number of chunks beyond the
    first (a prompt longer than 75 tokens): ``tokenizer`` a ClipTokenizer, ``encode(ids (n, 77) int64) -> numpy
    (n, 77, D)`` the text encoder."""
    comma = (tokenizer.tokens(",") or [-1])[0]
    parts = []
    for text in (positive, negative):
        ids, ws, _ = chunks(text or "", tokenizer.tokens, tokenizer.bos, tokenizer.eos, tokenizer.pad, comma)
        hidden = encode(np.asarray(ids, dtype=np.int64))
        parts.append([weighted(hidden[i:i + 1], np.asarray(w, dtype=np.float32)) for i, w in enumerate(ws)])
    longest = max(len(p) for p in parts)
    if any(len(p) < longest for p in parts):
        empty_ids, _, _ = chunks("", tokenizer.tokens, tokenizer.bos, tokenizer.eos, tokenizer.pad, comma)
        empty = encode(np.asarray(empty_ids, dtype=np.int64))
        parts = [p + [empty] * (longest - len(p)) for p in parts]
    pos, neg = (np.concatenate(p, axis=1) for p in parts)
    return pos, neg, longest - 1
