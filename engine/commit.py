"""Saving a generation: its files and its history row, so that a crash at any point leaves both or neither.

The sequence (each step named for fault injection, see ``fault``):

1. ``pending``: the history row is inserted as *pending*, naming the final paths, their sha256, the temporary
   files and this process's id. A pending row is never listed.
2. ``tmp``: each file is written to a hidden temporary file in its folder (fsync, mode from the umask).
3. ``link``: each temporary file is hard-linked to its final name, which fails if the name exists (two
   processes never write the same file; an existing file is replaced only when the caller says ``overwrite``).
   A name taken meanwhile moves the whole set to the next free number and the row is updated first.
4. ``done``: the row stops being pending (an earlier row whose file ``--overwrite`` replaced gets ``replaced_by``
   on that output); 5. ``cleanup``: the temporary names are removed.

A process that dies between 1 and 4 leaves a pending row whose process is gone. The next command that opens
the history (``History.recover``) finishes it when every final file is in place with its hash (for an
``overwrite``, after putting complete temporary files in place), and otherwise removes what it had written and
the row. When the history cannot be written at all (busy, damaged, read-only),
the files are still saved, and the caller is told so (``Saved.unrecorded``).
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from engine.errors import StateError, UsageError
from engine.outputs import cannot_write, tmp_name, unlink_quietly, write_new

Render = Callable[[Path], "list[tuple[Path, bytes]]"]  # primary path -> [(path, bytes)] (the primary first)


def fault(point: str) -> None:
    """Fault injection for the reliability tests: ``STUDIO_FAULT=point:action[,point:action]``, where action is
    ``kill`` (SIGKILL this process), ``enospc`` (a full disk) or ``locked`` (a busy database). Unset in normal use."""
    spec = os.environ.get("STUDIO_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.partition(":")
        if where != point:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if action == "locked":
            import sqlite3

            raise sqlite3.OperationalError("database is locked")


@dataclass
class Saved:
    files: list  # final paths, the primary first
    outputs: list  # [{"path", "sha256"}]
    history_id: Optional[int]
    unrecorded: str = ""  # why the history has no row for these files ("" when it has one)
    notes: list = field(default_factory=list)


def numbered(path: Path, n: int) -> Path:
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def _tmp_names(planned) -> list:
    return [tmp_name(p) for p, _ in planned]


def _outputs(planned) -> list:
    return [{"path": str(p), "sha256": hashlib.sha256(data).hexdigest()} for p, data in planned]


def _plan(render: Render, path: Path, start: int, search: bool) -> tuple[int, list]:
    """The first number from ``start`` whose names are all free (only ``start`` when not ``search``)."""
    n = start
    while True:
        planned = [(Path(p).resolve(), data) for p, data in render(numbered(path, n))]
        if not search or not any(p.exists() or p.is_symlink() for p, _ in planned):
            return n, planned
        n += 1


def save(render: Render, path: Path, recipe: dict, history, overwrite: bool = False) -> Saved:
    """Write the files ``render`` gives for ``path`` (or the next free numbered name) and record them in
    ``history`` (a History, or None for no record), in the order described above."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(cannot_write(path.parent, exc)) from None
    notes = []
    n, planned = _plan(render, path, 0, False)
    odd = [p for p, _ in planned if p.exists() and not p.is_file()]
    if odd:  # os.replace would put a file where a device, a pipe or a folder was
        raise UsageError(f"{odd[0]} is not a regular file; choose another output name.")
    taken = [p for p, _ in planned if p.exists() or p.is_symlink()]
    if taken and not overwrite:
        n, planned = _plan(render, path, 1, True)
        notes.append(f"{taken[0]} exists; saved as {planned[0][0].name} instead")
    row, unrecorded = None, ""
    tmps = _tmp_names(planned)
    every_tmp = list(tmps)  # all temporary names ever used, so that cleanup and recovery find each one
    if history is not None:
        try:
            fault("pending")
            row = history.begin(recipe | {"path": str(planned[0][0])}, _outputs(planned), every_tmp, overwrite)
        except StateError as exc:
            unrecorded = str(exc)
        except Exception as exc:  # noqa: BLE001 - an injected fault, or sqlite beyond History's own handling
            unrecorded = f"the history could not be written ({exc})"
    linked: list = []
    kept: list = []  # (path, a link to the user's file that --overwrite replaced): put back if the save fails
    try:
        for (p, data), tmp in zip(planned, tmps):
            write_new(tmp, data)
            fault("tmp")
        while True:
            try:
                for (p, _), tmp in zip(planned, tmps):
                    if overwrite:
                        was = Path(f"{tmp}.was")
                        try:
                            os.link(p, was)
                            kept.append((p, was))
                            every_tmp.append(was)
                        except FileNotFoundError:
                            pass
                        os.replace(tmp, p)
                        os.link(p, tmp)  # the temporary name stays until the row is done, as in the link case
                    else:
                        os.link(tmp, p)  # fails when the name exists: never replaces another file
                    linked.append(p)
                    fault("link")
                break
            except FileExistsError:  # another process took a name meanwhile: the next free number
                for p in linked:
                    unlink_quietly(p)
                linked = []
                n, replanned = _plan(render, path, n + 1, True)
                notes.append(f"{planned[0][0].name} was taken by another process meanwhile; saved as "
                             f"{replanned[0][0].name} instead")
                planned, tmps = replanned, _tmp_names(replanned)
                every_tmp += tmps
                if row is not None:
                    history.set_pending(row, _outputs(planned), every_tmp, path=str(planned[0][0]))
                for (p, data), tmp in zip(planned, tmps):
                    write_new(tmp, data)
        fault("done")
        if row is not None:
            history.finish(row)
    except BaseException as exc:
        for p in linked:
            unlink_quietly(p)
        for p, was in kept:  # the file --overwrite replaced is the user's again ("Nothing was saved" holds)
            try:
                os.replace(was, p)
            except OSError:
                pass
        for tmp in every_tmp:
            unlink_quietly(tmp)
        if row is not None:
            try:
                history.abandon(row)
            except StateError:
                pass  # the next command's recovery removes it
        if isinstance(exc, OSError):
            raise StateError(cannot_write(planned[0][0], exc) + " Nothing was saved.") from None
        raise
    for tmp in every_tmp:
        unlink_quietly(tmp)
    fault("cleanup")
    return Saved([p for p, _ in planned], _outputs(planned), row, unrecorded, notes)
