"""What makes a queue job safe across a crash: who holds a running job (and whether that process still lives),
the fixed output name of a job, the history row tagged with the job, and ``recover``, which puts back the jobs of
a process that died (engine/jobqueue.py). A job whose history row exists was finished and is not run twice."""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Optional

from engine.errors import StudioError
from engine.generators import digits
from engine.outputs import SUFFIXES

log = logging.getLogger(__name__)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not digits(pid):
        return False  # another machine's claim cannot be checked; a restart here takes it back
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def scratch_folder(parent: Path, prefix: str) -> Path:
    """A new scratch folder in ``parent`` named ``PREFIX<host>~<pid>-<random>``: whose it is, so that
    ``remove_dead_scratch`` can delete it once that process has died (killed mid-import, mid-export)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}~{os.getpid()}-", dir=parent))


def remove_dead_scratch(parent: Path, prefix: str) -> None:
    """Delete the ``scratch_folder(parent, prefix)`` folders of dead processes on this machine (each may hold a whole
    model: megabytes to gigabytes); a live process's, or another machine's, stay."""
    import glob
    import shutil

    for scratch in Path(parent).glob(glob.escape(prefix) + "*~*-*"):
        host, _, rest = scratch.name[len(prefix):].partition("~")
        pid = rest.split("-", 1)[0]
        if host == socket.gethostname() and digits(pid) and not owner_alive(f"{host}:{pid}"):
            shutil.rmtree(scratch, ignore_errors=True)


SERVER_PIN = "api"  # the pin of a server's jobs: "api:<host>:<pid>" (plain "api" before servers had their own)


def server_pin(owner: str) -> str:
    return f"{SERVER_PIN}:{owner}"


def _client_gone(pin: str, queue, sweep: bool) -> bool:
    """Whether a job pinned to a server (``pin``) lost its client: that server's process is dead, so nobody waits
    for the answer (a plain "api" pin is from before servers had their own: at a start, gone too)."""
    if pin != SERVER_PIN and not pin.startswith(SERVER_PIN + ":"):
        return False
    server = pin[len(SERVER_PIN) + 1:]
    if not server:
        return not sweep
    if server == queue.owner:  # at a start, this process has taken no job yet: a server that had its pid (a
        return not sweep  # restarted container) is gone
    if server.rpartition(":")[0] != socket.gethostname():
        return False  # (another machine's server cannot be checked from here)
    return not owner_alive(server)


def recover(queue, history_path: Path, out_dir: Path, sweep: bool = False) -> list:
    """Put back the jobs whose worker process died while running them. A job whose history row exists was
    finished (marked done, not run again); otherwise its partial output is deleted and it is queued again
    in its old place. Returns the ids put back. ``sweep``: a worker's look while it runs (not at its start): only
    the jobs of dead processes on this machine, never its own nor another machine's."""
    token, again = queue.token, []
    here = socket.gethostname()
    with queue._tx() as conn:
        for job_id, pin in conn.execute("SELECT id, pin FROM jobs WHERE state = 'queued'").fetchall():
            if _client_gone(pin, queue, sweep):  # waiting for a server that died: its client left with it
                conn.execute("UPDATE jobs SET state = 'cancelled', finished = ?, message = 'cancelled: the server "
                             "it was sent to stopped, and its client with it' WHERE id = ?", (time.time(), job_id))
        rows = conn.execute("SELECT id, owner, pin, cancel FROM jobs WHERE state = 'running'").fetchall()
        for job_id, owner, pin, cancel in rows:
            if owner and owner != queue.owner and owner_alive(owner):
                continue
            if sweep and (owner == queue.owner or owner.rpartition(":")[0] != here):
                continue
            recorded = recorded_history_id(history_path, f"{token}:{job_id}")
            if recorded is not None:
                conn.execute("UPDATE jobs SET state = 'done', finished = ?, owner = '', history_id = ?,"
                             " message = 'done (recorded before a restart)' WHERE id = ?",
                             (time.time(), recorded, job_id))
                continue
            for partial in Path(out_dir).glob(f"queue-{token}-{job_id}-*"):
                try:
                    partial.unlink()
                except OSError:
                    log.warning("could not delete the partial output %s", partial)
            if cancel or _client_gone(pin, queue, sweep):  # asked to stop, or nobody waits for it: not run again
                conn.execute("UPDATE jobs SET state = 'cancelled', finished = ?, owner = '', cancel = 0, message = ?"
                             " WHERE id = ?", (time.time(), "cancelled" if cancel else "cancelled: the server it "
                                               "was sent to stopped, and its client with it", job_id))
                continue
            conn.execute("UPDATE jobs SET state = 'queued', owner = '', cancel = 0, step = 0, total = 0,"
                         " message = 'put back after a restart' WHERE id = ?", (job_id,))
            again.append(job_id)
    if again:
        log.info("queue: jobs %s were running when the studio stopped; they are queued again", again)
    return again


def recorded_history_id(history_path: Path, tag: str) -> Optional[int]:
    """The history row a queue job wrote (``recipe["queue_job"] == tag``), if any."""
    if not Path(history_path).exists():
        return None
    from engine.history import History

    try:  # first settle the saves of dead processes (a pending row is finished or removed; engine/commit.py)
        History(Path(history_path))._connect().close()
    except StudioError:
        pass
    with closing(sqlite3.connect(history_path, timeout=30)) as conn:
        try:
            row = conn.execute("SELECT id FROM generations WHERE json_extract(recipe, '$.queue_job') = ? "
                               "AND pending IS NULL", (tag,)).fetchone()
        except sqlite3.OperationalError:  # no JSON functions in this SQLite, or no table yet
            try:
                row = conn.execute("SELECT id FROM generations WHERE recipe LIKE ? AND pending IS NULL",
                                   (f'%"queue_job": "{tag}"%',)).fetchone()
            except sqlite3.OperationalError:
                return None
    return int(row[0]) if row else None


def output_path(out_dir: Path, tag: str, generator: str, makes: str) -> Path:
    """The output file of a queue job: fixed by the job, so a restart finds (and discards) a partial one."""
    token, _, job_id = tag.partition(":")
    ext = SUFFIXES.get(makes, "txt")
    return Path(out_dir) / f"queue-{token}-{job_id}-{generator}.{ext}"


class TaggedHistory:
    """A history that marks each row it adds with the queue job that made it (what ``recover`` looks for)."""

    def __init__(self, history, tag: str):
        self.history, self.tag = history, tag

    def add(self, recipe: dict, outputs: list) -> int:
        recipe["queue_job"] = self.tag
        return self.history.add(recipe, outputs)

    def begin(self, recipe: dict, outputs: list, tmps: list, overwrite: bool = False) -> int:
        """The pending row of engine/commit.py's save sequence, tagged like ``add``'s."""
        return self.history.begin({**recipe, "queue_job": self.tag}, outputs, tmps, overwrite)

    def __getattr__(self, name):  # set_pending, finish, abandon, list, ...: the history's own
        return getattr(self.history, name)
