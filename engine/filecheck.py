"""Has a file changed since it was recorded? Size and modification time as the cheap trigger, the sha256 only when
they changed (or when no time was recorded).

The one mechanism for every recorded file: ONNX exports (``onnx.json`` lists each file's stamp), the saved
optimized graphs beside them, and model weights in the store. Hashing a 1.3 GB export takes seconds; a stat
takes microseconds, so a load only hashes what was touched since it was recorded.
"""
from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Optional


class Check(enum.Enum):
    UNCHANGED = "unchanged"  # size and modification time as recorded: not hashed
    VERIFIED = "verified"  # hashed (time differed or was not recorded) and the sha256 matches
    CHANGED = "changed"  # size or sha256 differs
    MISSING = "missing"


_HASHES: dict = {}  # (path, mtime_ns, size) -> sha256, so a file is hashed once per process


def sha256_file(path: Path) -> str:
    """The file's sha256 (memoised per process by path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        from engine.outputs import sha256_file as plain

        _HASHES[key] = plain(path)
    return _HASHES[key]


def read_ahead(path: Path) -> None:
    """Ask the kernel to start reading a whole file into the page cache in the background, sequentially: a
    memory-mapped weight file is otherwise read page by page, in whatever order the first computation touches it
    (measured: a cold first token took longer than with a runtime that reads the file at open). Best effort."""
    advise(path, "POSIX_FADV_WILLNEED")


def advise(path: Path, advice: str) -> None:
    """``posix_fadvise`` a whole file (``advice``: the os constant's name); nothing where the platform lacks it or
    the file cannot be opened. Best effort."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, getattr(os, advice))
        finally:
            os.close(fd)
    except OSError:
        pass


def stamp(path: Path, sha256: Optional[str] = None) -> dict:
    """``{"bytes", "mtime_ns", "sha256"}`` of a file as it is now (``sha256`` given when already known)."""
    st = Path(path).stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(path)}


def check_file(path: Path, recorded: dict, verify: bool = True) -> Check:
    """Compare a file with its recorded stamp (``bytes``, ``mtime_ns``, ``sha256``; any may be absent).

    A different size is a change without hashing. Same size and same recorded time: unchanged, not hashed.
    Otherwise (time differs, or none recorded) the sha256 decides, when one is recorded and ``verify`` is true."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return Check.MISSING
    if "bytes" in recorded and st.st_size != recorded["bytes"]:
        return Check.CHANGED
    if recorded.get("mtime_ns") is not None and st.st_mtime_ns == recorded["mtime_ns"]:
        return Check.UNCHANGED
    if not verify or not recorded.get("sha256"):
        return Check.UNCHANGED
    return Check.VERIFIED if sha256_file(path) == recorded["sha256"] else Check.CHANGED
