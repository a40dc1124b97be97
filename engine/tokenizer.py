"""A model folder's ``tokenizer.json``, read with the ``tokenizers`` library (shared by every family)."""
from __future__ import annotations

from pathlib import Path

from engine.errors import ModelError


def load_tokenizer(folder):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"Model folder {Path(folder).name} has no tokenizer.json.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a plain Exception subclass
        raise ModelError(f"{path} is corrupt or not a tokenizers file; re-download or re-export the model.") from None
