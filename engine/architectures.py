"""Model architectures: how the store recognises a model folder and how a generator loads it.

Plugins register ``Architecture`` objects through the ``register_architectures``
hook. Recognition works on plain JSON (no torch import); loading is up to the
plugin and happens at first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Architecture:
    """A model family.

    ``family``: the store's name for it (``llama``, ``gpt2``, ``shapes-diffusion``, ...).
    ``generator``: the generator id that runs it.
    ``matches(config: dict) -> bool``: whether a folder's ``config.json`` is of this family.
    ``check(folder: Path) -> None``: optional deeper check (tokenizer present, weights match the
    config); raises ``engine.errors.ModelError`` with a one-line reason.
    ``needs_tokenizer``: whether ``tokenizer.json`` is required.
    """

    family: str
    generator: str
    matches: Callable[[dict], bool]
    check: Optional[Callable[[Path], None]] = None
    needs_tokenizer: bool = True
    title: str = ""

    def __post_init__(self):
        if not self.family or not isinstance(self.family, str):
            raise ValueError("architecture family must be a non-empty string")
        if not callable(self.matches):
            raise ValueError(f"architecture {self.family!r}: matches must be callable")
