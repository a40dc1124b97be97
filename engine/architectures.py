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

    def verify(self, folder: Path) -> None:
        """Run ``check`` on ``folder``: anything it raises reaches the caller as one ModelError line (a family's
        check may meet any kind of damage in a user's folder)."""
        from engine.errors import ModelError

        if self.check is None:
            return
        try:
            self.check(Path(folder))
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{Path(folder).name} does not load as a {self.family} model: {exc}") from None


@dataclass(frozen=True)
class Importer:
    """A way into the model store for something that is not a studio model folder (a diffusers pipeline folder, a
    single-file checkpoint, ...): ``detect(path) -> bool`` says whether ``path`` is one (cheaply, no torch);
    ``convert(path, dest, trust) -> None`` writes a model folder an Architecture recognises into the empty folder
    ``dest`` (``trust``: the user allowed pickle files), raising ``engine.errors.ModelError`` with a one-line
    reason. The store then checks and imports ``dest`` as any folder; nothing is imported when either fails."""

    name: str
    detect: Callable[[Path], bool]
    convert: Callable[[Path, Path, bool], None]
    title: str = ""

    def __post_init__(self):
        if not self.name or not callable(self.detect) or not callable(self.convert):
            raise ValueError("an importer needs a name and callable detect and convert")
