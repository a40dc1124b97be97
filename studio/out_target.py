"""Where `--out` puts a command's output, checked before any work starts: a file or a folder, never one of the
studio's own state files, an existing file only with --overwrite, and never a user's own .json beside it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from engine.errors import UsageError
from engine.outputs import sidecar_of

STATE_FILES = ("history.sqlite3", "queue.sqlite3", "settings.json", "plugin_checks.json")  # and their -wal etc.


def out_target(given: Optional[str], batch: bool, overwrite: bool) -> tuple[Optional[Path], bool]:
    """(--out as a path, whether it is a folder), checked before any work: a trailing slash or an existing folder
    is a folder (made when missing); an existing file is replaced only with --overwrite."""
    if not given:
        return None, False
    out = Path(given).expanduser().absolute()  # as meant now: a plugin that changes the working folder must not
    is_dir = batch or given.endswith(("/", os.sep)) or out.is_dir()  # move it
    for parent in [out, *out.parents] if is_dir else list(out.parents):
        if parent.exists() and not parent.is_dir():
            if parent == out:
                raise UsageError(f"With several inputs --out must be a folder; {out} is a file.")
            raise UsageError(f"--out {given}: {parent} is a file, so nothing can be saved inside it.")
    if not is_dir and out.exists() and not out.is_file():
        raise UsageError(f"{out} is not a regular file (a device or a pipe); choose another --out.")
    from engine import state

    if not is_dir and out.resolve().parent == state.home().resolve() and out.name.startswith(STATE_FILES):
        raise UsageError(f"{out} is one of the studio's own files (its history, queue or settings); choose another "
                         "--out.")  # --overwrite replaced the history database, then it was lost
    if not is_dir and out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out.")
    if not is_dir and overwrite and out.suffix.lower() != ".png" and not _recipe_file(sidecar_of(out)):
        raise UsageError(f"{sidecar_of(out)} exists and is not a studio recipe; --overwrite would replace it with "
                         f"the recipe of {out.name}, so move it or choose another --out.")
    return out, is_dir


def _recipe_file(path: Path) -> bool:
    """Whether ``path`` is absent or a recipe the studio wrote (a JSON object with a generator): what --overwrite
    may replace beside a text or audio output."""
    if not path.exists():
        return True
    try:
        data = json.loads(path.read_bytes()[:10_000_000])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "generator" in data and "seed" in data
