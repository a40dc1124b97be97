"""A model folder's tokenizer, read with the ``tokenizers`` library (shared by every family): ``tokenizer.json``,
or, as some Hugging Face folders ship it, ``vocab.json`` + ``merges.txt`` (a byte-level BPE, GPT-2 style) with the
special tokens that ``tokenizer_config.json`` lists."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.errors import ModelError

log = logging.getLogger(__name__)


def has_tokenizer(folder) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                     and (folder / "merges.txt").is_file())


def read_tokenizer_config(folder) -> dict:
    """``tokenizer_config.json`` ({} when absent or unreadable): special tokens and the chat template."""
    path = Path(folder) / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; its special tokens and chat template are ignored.", path)
        return {}
    return data if isinstance(data, dict) else {}


def _from_vocab_merges(folder: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception:  # tokenizers raises a plain Exception subclass
        raise ModelError(f"vocab.json / merges.txt of {folder.name} are not a BPE vocabulary; re-download the "
                         "model.") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    cfg = read_tokenizer_config(folder)
    added = cfg.get("added_tokens_decoder") or {}
    specials = [AddedToken(v["content"], special=bool(v.get("special", True)), normalized=False)
                for _, v in sorted(added.items(), key=lambda kv: int(kv[0])) if isinstance(v, dict) and "content" in v]
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str) and v not in {s.content for s in specials}:
            specials.append(AddedToken(v, special=True, normalized=False))
    if specials:
        tok.add_special_tokens(specials)
    return tok


def load_tokenizer(folder):
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _from_vocab_merges(folder)
        raise ModelError(f"Model folder {folder.name} has no tokenizer.json (nor vocab.json and merges.txt).")
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a plain Exception subclass
        raise ModelError(f"{path} is corrupt or not a tokenizers file; re-download or re-export the model.") from None
