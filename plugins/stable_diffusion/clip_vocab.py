"""CLIP's BPE vocabulary shipped with the studio (resources/tokenizers/clip, MIT, from open_clip), written as
``vocab.json`` + ``merges.txt`` for checkpoints that carry no tokenizer files. Built as CLIP's tokenizer builds
it: the 256 byte characters, the same ending a word (``</w>``), the 48894 merges joined, then the start and end
tokens (49408 entries)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "resources" / "tokenizers" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file


def byte_chars() -> list:
    """GPT-2/CLIP's printable stand-in for each byte, in CLIP's order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_vocab(folder: Path) -> None:
    """vocab.json and merges.txt of CLIP's tokenizer into ``folder``."""
    lines = gzip.decompress(SOURCE.read_bytes()).decode("utf-8").split("\n")[1:MERGES + 1]
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
