"""The job queue: every job the GUI, the CLI and the server submit, kept in SQLite so that it survives a restart.

One database, ``queue.sqlite3`` in the state folder (its own file: the history database is not touched). A job is
a row: its kind (``generate``), its payload (the fields of an ``engine.runner.Job``), its state
(queued -> running -> done | failed | cancelled), its place in the queue and its progress. Any process may work the
queue (``claim`` is one transaction, so two workers never take the same job); a job that was running in a process
that died is put back by ``recover``, its partial output deleted, unless its history row was already written (then
it is marked done: nothing is recorded twice). The queue as a whole can be paused; a paused queue hands out no job.

Outputs of queue jobs get a name fixed by the job (``queue-<queue token>-<id>-<generator>.<ext>``), and the history
row carries ``recipe["queue_job"] = "<queue token>:<id>"``, which is what ``recover`` looks for.
"""
from __future__ import annotations

import itertools
import json
import logging
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Iterator, Optional

from engine import jobsave, state
from engine.configs import loads_as
from engine.errors import StateError, UsageError

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_RUNS = 2  # a job whose worker died while running it this many times is failed when claimed again
KINDS = ("generate", "export", "finetune")  # generate: an engine.runner.Job; export: {model, quantize, force};
# finetune: {kind, args} (a fine-tuner's command-line arguments; engine/finetune.py resumes from its checkpoint)
MAX_GRID = 1000  # jobs in one grid submission

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    position REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    pin TEXT NOT NULL DEFAULT '',
    batch TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    error_type TEXT NOT NULL DEFAULT '',
    history_id INTEGER,
    result TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    cancel INTEGER NOT NULL DEFAULT 0,
    grid INTEGER,
    cell TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, position);
CREATE TABLE IF NOT EXISTS grids (id INTEGER PRIMARY KEY AUTOINCREMENT, spec TEXT NOT NULL, sheet TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class QueueJob:
    id: int
    kind: str
    job: dict  # engine.runner.Job fields
    state: str
    position: float
    source: str = ""
    pin: str = ""
    batch: str = ""
    created: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None
    step: int = 0
    total: int = 0
    message: str = ""
    error: str = ""
    error_type: str = ""
    history_id: Optional[int] = None
    result: Optional[dict] = None  # {"files": [...], "text": ..., "recipe": {...}}
    attempts: int = 0
    owner: str = ""
    cancel: bool = False
    grid: Optional[int] = None
    cell: dict = field(default_factory=dict)
    tag: str = ""  # "<queue token>:<id>", set by the worker that runs it
    damaged: str = ""  # why the stored row cannot be read as a job ("" when it can)

    @property
    def progress(self) -> float:
        return 1.0 if self.state == "done" else (self.step / self.total if self.total > 0 else 0.0)

    @property
    def label(self) -> str:
        j = self.job
        if self.kind == "export":
            return f"export {j.get('model')}" + (f" ({j['quantize']})" if j.get("quantize") else "")
        if self.kind == "finetune":
            return f"finetune {j.get('kind')} {' '.join(map(str, j.get('args', [])))[:50]}"
        what = j.get("prompt") or j.get("image") or ""
        return f"{j.get('generator', '?')}: {str(what).replace(chr(10), ' ')[:60]}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["progress"] = round(self.progress, 4)
        return d


def payload_of(job, kind: str = "generate") -> dict:
    """A Job (or a plain dict of its fields) as the JSON-ready payload the queue stores."""
    data = asdict(job) if is_dataclass(job) else dict(job)
    need = {"generate": "generator", "export": "model", "finetune": "kind"}[kind]
    if not data.get(need):
        raise UsageError(f"A{'n' if kind == 'export' else ''} {kind} job needs a {need}.")
    if data.get("image") is not None:
        data["image"] = str(data["image"])
    return json.loads(json.dumps(data, default=str))


def _row_id(job_id) -> int:
    """A job id as SQLite takes it; one past its 64-bit range names no job (it was an OverflowError)."""
    value = int(job_id)
    if not 0 <= value < 2**63:
        raise UsageError(f"There is no job {job_id} in the queue.")
    return value


class JobQueue:
    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path else state.home() / "queue.sqlite3"
        self.owner = jobsave.owner_id()
        self._local = threading.local()
        with self._tx():
            pass

    # ----- plumbing ----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, kept open: closing the last connection to a WAL database checkpoints it
        (an fsync, ~10 ms here), which every queue operation would otherwise pay."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            state.ensure_dir(self.path.parent)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: consistent after any crash, durable past a kill
            conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"The queue database {self.path} cannot be opened ({exc}); move it aside to start "
                             "with an empty queue.") from None
        conn.row_factory = sqlite3.Row
        self._local.conn = conn
        return conn

    def close_thread(self) -> None:
        """Close this thread's connection (a short-lived thread calls it before it ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: other processes wait; all or nothing)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
                raise StateError(f"The queue database {self.path} is damaged ({exc}); move it aside to start "
                                 "with an empty queue.") from None
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"The queue database {self.path} could not be updated ({exc}).") from None
            raise

    @property
    def token(self) -> str:
        """This queue's random name: it tells its outputs and history rows apart from another queue's."""
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'token'").fetchone()
            if row:
                return row[0]
            value = secrets.token_hex(4)
            conn.execute("INSERT INTO meta (key, value) VALUES ('token', ?)", (value,))
            return value

    def tag(self, job_id: int) -> str:
        return f"{self.token}:{job_id}"

    # ----- submitting ------------------------------------------------------------------------
    def submit(self, job, kind: str = "generate", source: str = "", pin: str = "", batch: str = "",
               front: bool = False, grid: Optional[int] = None, cell: Optional[dict] = None) -> int:
        if kind not in KINDS:
            raise UsageError(f"A queue job is one of {', '.join(KINDS)}, not {kind!r}.")
        payload = payload_of(job, kind)
        with self._tx() as conn:
            return self._insert(conn, kind, payload, source, pin, batch, front, grid, cell)

    def submit_many(self, jobs: list, source: str = "", pin: str = "", batch: str = "") -> list:
        payloads = [payload_of(j) for j in jobs]
        with self._tx() as conn:
            return [self._insert(conn, "generate", p, source, pin, batch, False, None, None) for p in payloads]

    @staticmethod
    def _insert(conn, kind, payload, source, pin, batch, front, grid, cell) -> int:
        lo, hi = conn.execute("SELECT MIN(position), MAX(position) FROM jobs").fetchone()
        position = ((lo or 0) - 1) if front else ((hi or 0) + 1)
        cur = conn.execute(
            "INSERT INTO jobs (position, kind, payload, state, source, pin, batch, created, grid, cell)"
            " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
            (position, kind, json.dumps(payload), source, pin, batch, time.time(), grid,
             json.dumps(cell) if cell else None))
        return int(cur.lastrowid)

    def submit_grid(self, job, prompts: list, seeds: list, axes: dict, source: str = "") -> tuple:
        """A parameter grid as one submission: every prompt x every seed x the values of one or two options
        (the X/Y plot). Returns (grid id, job ids). A contact sheet is made when the last of them finishes."""
        base = payload_of(job)
        prompts = list(prompts) or [base.get("prompt")]
        seeds = list(seeds) or [base.get("seed")]
        axes = {str(k): list(v) for k, v in (axes or {}).items()}
        if len(axes) > 2:
            raise UsageError(f"A grid varies at most two options, not {len(axes)} ({', '.join(axes)}).")
        for name, values in axes.items():
            if not values:
                raise UsageError(f"Grid option {name} has no values; give them as {name}=A,B,C.")
        cells = list(itertools.product(range(len(prompts)), range(len(seeds)), *(range(len(v)) for v in axes.values())))
        if len(cells) > MAX_GRID:
            raise UsageError(f"The grid has {len(cells)} jobs; the limit is {MAX_GRID} in one submission.")
        spec = {"prompts": prompts, "seeds": seeds, "axes": axes, "generator": base["generator"]}
        with self._tx() as conn:
            grid = int(conn.execute("INSERT INTO grids (spec) VALUES (?)", (json.dumps(spec),)).lastrowid)
            ids = []
            for c in cells:
                payload = dict(base, prompt=prompts[c[0]], seed=seeds[c[1]],
                               options={**base.get("options", {}),
                                        **{name: axes[name][i] for name, i in zip(axes, c[2:])}})
                cell = {"prompt": c[0], "seed": c[1], **{name: i for name, i in zip(axes, c[2:])}}
                ids.append(self._insert(conn, "generate", payload, source, "", "", False, grid, cell))
        return grid, ids

    # ----- reading -----------------------------------------------------------------------------
    def list(self, states: tuple = (), batch: str = "", limit: int = 500) -> list[QueueJob]:
        """Running jobs first, then the queued ones in the order they will run, then the finished ones, newest
        first."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        if batch:
            sql += " AND batch = ?"
            args.append(batch)
        sql += (" ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END,"
                " CASE WHEN state IN ('running', 'queued') THEN position ELSE -finished END, id LIMIT ?")
        args.append(int(limit))
        conn = self._connect()
        return [_job(r) for r in conn.execute(sql, args)]

    def get(self, job_id: int) -> QueueJob:
        conn = self._connect()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (_row_id(job_id),)).fetchone()
        if row is None:
            raise UsageError(f"There is no job {job_id} in the queue.")
        return _job(row)

    def grid(self, grid_id: int) -> dict:
        conn = self._connect()
        row = conn.execute("SELECT * FROM grids WHERE id = ?", (int(grid_id),)).fetchone()
        if row is None:
            raise UsageError(f"There is no grid {grid_id} in the queue.")
        return {"id": row["id"], "spec": json.loads(row["spec"]), "sheet": row["sheet"]}

    def paused(self) -> bool:
        conn = self._connect()
        row = conn.execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()
        return bool(row and row[0] == "1")

    # ----- ordering and control ---------------------------------------------------------------
    def move(self, job_id: int, index: int) -> None:
        """Put a queued job at ``index`` (0 = next to run) among the queued jobs."""
        with self._tx() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position, id")]
            row_id = _row_id(job_id)
            if row_id not in ids:
                raise UsageError(f"Job {job_id} is not waiting in the queue, so it cannot be moved.")
            ids.remove(row_id)
            ids.insert(max(0, min(int(index), len(ids))), row_id)
            conn.executemany("UPDATE jobs SET position = ? WHERE id = ?", [(i + 1, j) for i, j in enumerate(ids)])

    def to_front(self, job_id: int) -> None:
        self.move(job_id, 0)

    def set_paused(self, paused: bool) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)", ("1" if paused else "0",))

    def cancel(self, job_id: int) -> str:
        """Cancel a queued job at once, or ask the worker running it to stop. Returns the new state."""
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (_row_id(job_id),)).fetchone()
            if row is None:
                raise UsageError(f"There is no job {job_id} in the queue.")
            if row[0] == "queued":
                conn.execute("UPDATE jobs SET state = 'cancelled', finished = ?, message = 'cancelled' WHERE id = ?",
                             (time.time(), _row_id(job_id)))
                return "cancelled"
            if row[0] == "running":
                conn.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (_row_id(job_id),))
                return "cancelling"
            raise UsageError(f"Job {job_id} has already finished ({row[0]}); there is nothing to cancel.")

    def retry(self, job_id: int) -> None:
        """Queue a failed or cancelled job again, at the end."""
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (_row_id(job_id),)).fetchone()
            if row is None:
                raise UsageError(f"There is no job {job_id} in the queue.")
            if row[0] not in ("failed", "cancelled"):
                raise UsageError(f"Job {job_id} is {row[0]}; only a failed or cancelled job can be retried.")
            hi = conn.execute("SELECT MAX(position) FROM jobs").fetchone()[0] or 0
            # a job a server took for a client is unpinned: that client is gone, any worker may run it now
            conn.execute("UPDATE jobs SET state = 'queued', position = ?, error = '', error_type = '', message = '',"
                         " cancel = 0, step = 0, total = 0, started = NULL, finished = NULL, attempts = 0,"
                         " pin = CASE WHEN pin = 'api' OR pin LIKE 'api:%' THEN '' ELSE pin END WHERE id = ?",
                         (hi + 1, _row_id(job_id)))

    def clear(self) -> int:
        """Forget the finished jobs (their outputs and history rows stay), except the cells of a grid that is still
        running: its contact sheet is made from them. Returns how many."""
        with self._tx() as conn:
            return conn.execute("DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND (grid IS NULL"
                                " OR grid NOT IN (SELECT grid FROM jobs WHERE grid IS NOT NULL"
                                " AND state IN ('queued', 'running')))").rowcount

    # ----- the worker's side ----------------------------------------------------------------------
    def claim(self, pin: str = "", batch: str = "", kinds: tuple = KINDS) -> Optional[QueueJob]:
        """Take the next queued job for this process (none while paused). A worker with a ``pin`` also takes the
        jobs pinned to it; jobs pinned elsewhere are left alone. ``batch``: only that batch's jobs; ``kinds``: only
        jobs of these kinds (the window runs generations only)."""
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()
            if row and row[0] == "1" and not batch:
                return None
            sql = (f"SELECT id FROM jobs WHERE state = 'queued' AND pin IN ('', ?)"
                   f" AND kind IN ({','.join('?' * len(kinds))})")
            args = [pin, *kinds]
            if batch:
                sql += " AND batch = ?"
                args.append(batch)
            while True:
                found = conn.execute(sql + " ORDER BY position, id LIMIT 1", args).fetchone()
                if found is None:
                    return None
                job = _job(conn.execute("SELECT * FROM jobs WHERE id = ?", (found[0],)).fetchone())
                why = job.damaged or _unrunnable(job) or (
                    f"its worker process ended while running it {job.attempts} times (a crash, or a plugin that "
                    f"ends the process); `studio queue retry {job.id}` runs it once more" if job.attempts >= MAX_RUNS
                    else "")
                if why:  # failed with its reason, so that it neither blocks the queue nor stays "running"
                    conn.execute("UPDATE jobs SET state = 'failed', finished = ?, owner = '', error = ?,"
                                 " error_type = 'UsageError', message = 'failed' WHERE id = ?",
                                 (time.time(), f"Job {job.id} was not run: {why}.", job.id))
                    continue
                conn.execute("UPDATE jobs SET state = 'running', started = ?, owner = ?, attempts = attempts + 1,"
                             " step = 0, total = 0, message = '' WHERE id = ?", (time.time(), self.owner, found[0]))
                return _job(conn.execute("SELECT * FROM jobs WHERE id = ?", (found[0],)).fetchone())

    def report(self, job_id: int, step: int, total: int, message: str = "") -> bool:
        """Record progress; returns True when someone asked to cancel the job."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET step = ?, total = ?, message = ? WHERE id = ?",
                         (int(step), int(total), str(message)[:200], _row_id(job_id)))
            row = conn.execute("SELECT cancel FROM jobs WHERE id = ?", (_row_id(job_id),)).fetchone()
        return bool(row and row[0])

    def cancel_requested(self, job_id: int) -> bool:
        conn = self._connect()
        row = conn.execute("SELECT cancel FROM jobs WHERE id = ?", (_row_id(job_id),)).fetchone()
        return bool(row and row[0])

    def finish(self, job_id: int, history_id: Optional[int], result: dict) -> None:
        self._end(job_id, "done", history_id=history_id, result=json.dumps(result, default=str), message="done")

    def fail(self, job_id: int, message: str, error_type: str = "") -> None:
        self._end(job_id, "failed", error=message, error_type=error_type, message="failed")

    def cancelled(self, job_id: int) -> None:
        self._end(job_id, "cancelled", message="cancelled")

    def _end(self, job_id: int, new_state: str, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as conn:
            conn.execute(f"UPDATE jobs SET state = ?, finished = ?, owner = '', {cols} WHERE id = ?",
                         (new_state, time.time(), *fields.values(), _row_id(job_id)))

    def release(self, job_id: int) -> None:
        """Put a running job back at its old place (its worker stopped without finishing it: the window closed,
        Ctrl+C); one whose cancel was asked for is cancelled instead."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET state = CASE cancel WHEN 0 THEN 'queued' ELSE 'cancelled' END,"
                         " attempts = MAX(attempts - 1, 0),"  # (put back, not crashed: see MAX_RUNS)
                         " finished = CASE cancel WHEN 0 THEN NULL ELSE ? END, owner = '', cancel = 0, step = 0,"
                         " total = 0, message = CASE cancel WHEN 0 THEN 'put back' ELSE 'cancelled' END"
                         " WHERE id = ? AND state = 'running'", (time.time(), _row_id(job_id)))

    def set_sheet(self, grid_id: int, path: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE grids SET sheet = ? WHERE id = ?", (path, int(grid_id)))

    def grid_jobs(self, grid_id: int) -> list[QueueJob]:
        conn = self._connect()
        return [_job(r) for r in conn.execute("SELECT * FROM jobs WHERE grid = ? ORDER BY id", (int(grid_id),))]

    def recover(self, history_path: Path, out_dir: Path, sweep: bool = False) -> list:
        """Put back the jobs whose worker process died while running them (engine.jobsave.recover)."""
        return jobsave.recover(self, history_path, out_dir, sweep)


def _job(row) -> QueueJob:
    """A row as a QueueJob; a payload that is not a JSON object (a damaged row) reads as an empty job with the
    reason in ``damaged`` (a damaged result or cell reads as none), so one row cannot break every listing."""
    d = dict(row)
    d["job"], d["damaged"] = loads_as(d.pop("payload"), dict), ""
    if d["job"] is None:
        d["job"], d["damaged"] = {}, "its stored job is not the JSON object the studio writes (a damaged row)"
    d["result"] = loads_as(d["result"], dict)
    d["cell"] = loads_as(d["cell"], dict) or {}
    d["cancel"] = bool(d["cancel"])
    return QueueJob(**d)


def _unrunnable(job: QueueJob) -> str:
    """Why a queued job cannot run ("" when it can): a generation whose fields are not a Job's (written by another
    version of the studio, or by hand), an export or fine-tune without its model or kind."""
    if job.kind == "generate":
        from engine.runner import REPLAY_ONLY, job_from_dict

        try:
            job_from_dict({k: v for k, v in job.job.items() if k not in REPLAY_ONLY})
        except UsageError as exc:
            return str(exc).rstrip(".")
        return ""
    need = {"export": "model", "finetune": "kind"}.get(job.kind)
    if need is None:
        return f"its kind {job.kind!r} is none of {', '.join(KINDS)}"
    return "" if isinstance(job.job.get(need), str) and job.job[need] else f"it names no {need}"

