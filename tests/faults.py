"""The fault-injection harness (docs/reliability.md): run the real `studio` CLI under a fault, then check the
invariants of the state folder and the output folder.

A fault is one of: a SIGKILL at a named step of the save sequence (engine/commit.py, ``STUDIO_FAULT``), a full
disk at a named step, or a real one (RLIMIT_FSIZE: writes past N bytes fail with EFBIG), a busy or damaged history
database, and concurrent processes with equal seeds or equal --out names.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

KILL_POINTS = ("pending", "tmp", "link", "done", "cleanup")


@dataclass
class Run:
    args: tuple
    rc: int
    stdout: str
    stderr: str


@dataclass
class Tally:
    faults: int = 0
    checks: int = 0
    kinds: dict = field(default_factory=dict)

    def fault(self, kind: str) -> None:
        self.faults += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def cmd(*args) -> list:
    return [sys.executable, "-m", "studio.cli", *args]


def _limit(nbytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def studio(*args, fault: str = "", fsize: int = 0, env: dict | None = None) -> Run:
    e = {**os.environ, **(env or {})}
    if fault:
        e["STUDIO_FAULT"] = fault
    proc = subprocess.run(cmd(*args), capture_output=True, text=True, env=e, timeout=120,
                          preexec_fn=_limit(fsize) if fsize else None)
    return Run(args, proc.returncode, proc.stdout, proc.stderr)


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def snapshot(folder: Path) -> dict:
    """{path: sha256} of every file under ``folder`` (hidden ones too)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


def rows(home: Path) -> list:
    db = home / "history.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(generations)")]
        pending = "pending" if "pending" in cols else "NULL"
        return [(i, json.loads(o), p) for i, o, p in conn.execute(f"SELECT id, outputs, {pending} FROM generations")]


def check(tally: Tally, home: Path, out: Path, before: dict, runs: list, named: tuple = ()) -> None:
    """The invariants, after the faulted commands and one ordinary command (which settles what a dead process
    left pending). ``before``: the snapshot of ``out`` before; ``named``: files the user asked to replace."""
    settle = studio("history", "list", "--json")
    assert settle.rc in (0, 1), settle.stderr
    told = " ".join(r.stderr + r.stdout for r in runs)
    # 1. no traceback reaches the user, and the exit status is 0, 1, 2 or the injected kill
    for r in runs + [settle]:
        tally.checks += 1
        assert "Traceback" not in r.stderr, r.stderr
        assert r.rc in (0, 1, 2, -9), (r.args, r.rc, r.stderr)
        tally.checks += 1
        assert len([line for line in r.stderr.splitlines() if line.startswith("studio: error")]) <= 1, r.stderr
    # 2. every history row is settled and points to files whose content hash matches
    named_by_rows = set()
    for id_, outputs, pending in rows(home):
        tally.checks += 1
        assert pending is None, f"row {id_} is still pending after a later command"
        for o in outputs:
            tally.checks += 1
            if o.get("replaced_by"):  # the user replaced this file later with --overwrite, and the row says so
                assert o["replaced_by"] in {r[0] for r in rows(home)}, (id_, o)
                continue
            p = Path(o["path"])
            assert p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == o["sha256"], (id_, o)
            named_by_rows.add(str(p))
    after = snapshot(out)
    # 3. no file is left that no row names, unless a message names it; no temporary file is left
    for path in after:
        if path in before:
            continue
        tally.checks += 1
        assert not Path(path).name.endswith(".tmp"), f"temporary file left: {path}"
        tally.checks += 1
        assert path in named_by_rows or path in told or Path(path).name.removesuffix(".json") in told, \
            f"{path} is named by no history row and no message"
    # 4. nothing that existed before is changed unless the user named it
    for path, digest in before.items():
        if path in named:
            continue
        tally.checks += 1
        assert after.get(path) == digest, f"{path} existed before and was changed or removed"
