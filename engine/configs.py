"""One rule for reading a section of a model's config.json (transformers' or diffusers') into a config dataclass
(without torch: the numpy schedulers read theirs too).

``read(cls, section, where)`` takes the keys the dataclass names (the rest of the file is the business of the
library that wrote it), ``renamed`` maps another spelling of a key onto the dataclass's, and ``given`` sets fields
the caller decides. A missing key takes the field's default; a key without a default must be there. A JSON list
becomes a tuple where the field is a tuple. A field typed ``int`` must hold a whole number, ``float`` a number and
``str`` a string; looser fields (``Optional[...]``, ``object``, lists) keep what the file says, since real configs
use them loosely (Llama 3 lists several ``eos_token_id``). Every failure is one ``ModelError`` sentence that names
``where`` and the key, never a ``TypeError`` from deep inside a network.

``read_json(path, what)``: a model folder's JSON file as a dict, or one sentence saying it is missing, damaged
or not an object. ``check_attention(cfg, where)``: what every transformer config needs (the width divides into
the heads, the activation is one the studio computes).
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from engine.errors import ModelError


def read_json(path, what: str = "") -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path.parent.name} has no {path.name}" + (f"; a model folder needs {what}." if what else
                                                                      "; choose a model folder.")) from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid JSON; the model folder is damaged (import or export it "
                         "again).") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object; the model folder is damaged (import or export it "
                         "again).")
    return data


def loads_as(text, kind):
    """``text`` read as JSON of type ``kind``; None when it is empty, not JSON (or nested past Python's stack) or of
    another type: a stored row that a person or a crash damaged reads as missing, not as an exception."""
    try:
        value = json.loads(text) if text else None
    except (ValueError, TypeError, RecursionError):
        return None
    return value if isinstance(value, kind) else None


def read(cls, section, where: str, renamed: dict | None = None, **given):
    if not isinstance(section, dict):
        raise ModelError(f"The {where} section of the model's config is not a JSON object.")
    renamed = renamed or {}
    section = {renamed.get(k, k): v for k, v in section.items()}
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name in section:
            values[f.name] = _typed(section[f.name], hints[f.name], f"The {where}'s {f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ModelError(f"The {where} section of the model's config has no {f.name!r}.")
    return cls(**values)


def _typed(value, hint, what: str):
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"{what} is {value!r} in the model's config; it must be a whole number.")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelError(f"{what} is {value!r} in the model's config; it must be a number.")
        value = float(value)
        if not math.isfinite(value):  # NaN or Infinity: every output would be NaN (an empty text, exit 0)
            raise ModelError(f"{what} is {value!r} in the model's config; it must be a finite number.")
    elif hint is str and not isinstance(value, str):
        raise ModelError(f"{what} is {value!r} in the model's config; it must be a string.")
    elif hint is tuple and isinstance(value, list):
        value = tuple(value)
    return value


def check_attention(cfg, where: str) -> None:
    from engine.nn.blocks import ACTIVATIONS  # torch: only the networks call this; schedulers read configs without it

    if cfg.num_attention_heads < 1 or cfg.hidden_size % cfg.num_attention_heads:
        raise ModelError(f"The {where}'s hidden_size ({cfg.hidden_size}) is not a multiple of num_attention_heads "
                         f"({cfg.num_attention_heads}).")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ModelError(f"The {where}'s activation {cfg.hidden_act!r} is not supported (use one of "
                         f"{', '.join(sorted(ACTIVATIONS))}).")
