"""History: one SQLite row per generation, with its full recipe and its output files and hashes.

The database has a schema version (``PRAGMA user_version``) and a small migration runner: ``MIGRATIONS[v]``
takes a database at version v to v + 1 in one transaction, so an older database (the studio's first ones are
version 0) is brought up to date the first time a newer studio opens it, and a crash mid-migration leaves the
old version intact. Version 1 adds an ISO 8601 timestamp, the generated text in its own column and a full-text
index (SQLite FTS5) over prompts and generated text, which ``list(search=...)`` uses. Version 2 adds ``pending``:
a row being saved (engine/commit.py) names its process and temporary files there until its files are in place;
pending rows are never listed, and ``recover`` finishes or removes those whose process has died.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine import state
from engine.configs import loads_as
from engine.errors import StateError, UsageError

BASE = """
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    generator TEXT NOT NULL,
    prompt TEXT,
    model TEXT,
    seed INTEGER,
    recipe TEXT NOT NULL,
    outputs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_created ON generations(created);
"""

V1 = """
ALTER TABLE generations ADD COLUMN created_iso TEXT;
ALTER TABLE generations ADD COLUMN text TEXT;
UPDATE generations SET created_iso = strftime('%Y-%m-%dT%H:%M:%fZ', created, 'unixepoch'),
                       text = json_extract(recipe, '$.text');
CREATE VIRTUAL TABLE generations_fts USING fts5(prompt, text, content='generations', content_rowid='id');
INSERT INTO generations_fts(rowid, prompt, text) SELECT id, prompt, text FROM generations;
CREATE TRIGGER generations_ai AFTER INSERT ON generations BEGIN
    INSERT INTO generations_fts(rowid, prompt, text) VALUES (new.id, new.prompt, new.text);
END;
CREATE TRIGGER generations_ad AFTER DELETE ON generations BEGIN
    INSERT INTO generations_fts(generations_fts, rowid, prompt, text) VALUES ('delete', old.id, old.prompt, old.text);
END;
"""

V2 = """
ALTER TABLE generations ADD COLUMN pending TEXT;
"""

MIGRATIONS = [V1, V2]  # MIGRATIONS[v]: version v -> v + 1
VERSION = len(MIGRATIONS)
MAX_ID = 2 ** 63 - 1
BUSY_TIMEOUT_S = 10  # how long a write waits for another process's transaction (STUDIO_HISTORY_TIMEOUT)


@dataclass
class Entry:
    id: int
    created: float
    generator: str
    prompt: str
    model: str
    seed: int
    recipe: dict
    outputs: list  # [{"path": str, "sha256": str}]

    def to_dict(self) -> dict:
        return {"id": self.id, "created": self.created, "generator": self.generator, "prompt": self.prompt,
                "model": self.model, "seed": self.seed, "recipe": self.recipe, "outputs": self.outputs}


def _problem(path: Path, exc: sqlite3.Error) -> StateError:
    """A message that tells a busy database from a damaged one: only the second needs the user to act."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return StateError(f"The history database {path} is busy: another studio process is writing to it. Try "
                          "again in a moment; nothing is wrong with it.")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text
                                                   or "corrupt" in text or "disk image" in text):
        return StateError(f"The history database {path} is damaged ({exc}). The studio leaves it as it is: to keep "
                          "using the studio, rename it (for example to history.sqlite3.damaged) and a new one "
                          "starts; the damaged copy may still be recovered with sqlite3's .recover command.")
    if "disk i/o" in text or "full" in text:
        return StateError(f"The history database {path} cannot be written ({exc}): the disk is full or failing; "
                          "free some space.")
    return StateError(f"The history database {path} cannot be used ({exc}).")


class History:
    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path else state.home() / "history.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        state.ensure_dir(self.path.parent)
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=state.env_number("STUDIO_HISTORY_TIMEOUT", BUSY_TIMEOUT_S))
            conn.executescript(BASE)
            migrate(conn)
            recover(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise _problem(self.path, exc) from None
        return conn

    def add(self, recipe: dict, outputs: list, pending: Optional[dict] = None) -> int:
        """Insert one generation in a single transaction; returns its id."""
        model = (recipe.get("model") or {}).get("name", "")
        users = [m.get("content", "") for m in recipe.get("messages") or []
                 if isinstance(m, dict) and m.get("role") == "user"]
        prompt = recipe.get("prompt") or (users[-1] if users else "")  # a conversation is listed by its last message
        created = recipe.get("created", time.time())
        iso = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(timespec="milliseconds")
        with closing(self._connect()) as conn:
            try:
                with conn:  # commits, or rolls back on any error: never half a row
                    cur = conn.execute(
                        "INSERT INTO generations (created, created_iso, generator, prompt, model, seed, recipe, "
                        "outputs, text, pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (created, iso.replace("+00:00", "Z"), recipe["generator"], prompt, model, recipe.get("seed"),
                         json.dumps(recipe, sort_keys=True), json.dumps(outputs), recipe.get("text"),
                         json.dumps(pending) if pending else None))
                    return int(cur.lastrowid)
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    # ----- the save sequence of engine/commit.py ---------------------------------------------------------
    def begin(self, recipe: dict, outputs: list, tmps: list, overwrite: bool = False) -> int:
        """A pending row for files about to be written by this process through the temporary names ``tmps``
        (``overwrite``: the user named files to replace, so recovery may finish putting them in place)."""
        return self.add(recipe, outputs, pending={"pid": os.getpid(), "host": socket.gethostname(),
                                                  "tmps": [str(t) for t in tmps], "overwrite": overwrite})

    def set_pending(self, entry_id: int, outputs: list, tmps: list, path: Optional[str] = None) -> None:
        pending = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "tmps": [str(t) for t in tmps]})
        self._write("UPDATE generations SET outputs = ?, pending = ?, recipe = CASE WHEN ? IS NULL THEN recipe "
                    "ELSE json_set(recipe, '$.path', ?) END WHERE id = ?",
                    (json.dumps(outputs), pending, path, path, entry_id))

    def finish(self, entry_id: int) -> None:
        with closing(self._connect()) as conn:
            try:
                with conn:
                    _finish(conn, entry_id)
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    def abandon(self, entry_id: int) -> None:
        self._write("DELETE FROM generations WHERE id = ? AND pending IS NOT NULL", (entry_id,))

    def _write(self, sql: str, args: tuple) -> None:
        with closing(self._connect()) as conn:
            try:
                with conn:
                    conn.execute(sql, args)
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    def list(self, limit: int = 50, search: str = "", generator: str = "") -> list[Entry]:
        """The newest generations; ``search``: words that must all occur in the prompt or the generated text
        (full-text over SQLite FTS5, case-insensitive, each word matching the start of a word)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError(f"The number of rows to list must be 1 or more, not {limit!r}.")
        limit = min(limit, 2 ** 63 - 1)  # SQLite's largest number (a larger one was 'unexpected OverflowError')
        sql = f"SELECT {COLUMNS} FROM generations WHERE pending IS NULL"
        args: list = []
        if search.strip():
            sql += " AND id IN (SELECT rowid FROM generations_fts WHERE generations_fts MATCH ?)"
            args.append(fts_query(search))
        if generator:
            sql += " AND generator = ?"
            args.append(generator)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(int(limit))
        with closing(self._connect()) as conn:
            try:
                return [_entry(row) for row in conn.execute(sql, args)]
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    def get(self, entry_id: int) -> Entry:
        if not 0 < int(entry_id) <= MAX_ID:
            raise UsageError(f"There is no generation {entry_id} in the history.")
        with closing(self._connect()) as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM generations WHERE id = ? AND pending IS NULL",
                               (int(entry_id),)).fetchone()
        if row is None:
            raise UsageError(f"There is no generation {entry_id} in the history.")
        return _entry(row)

    def delete(self, entry_id: int) -> None:
        if not 0 < int(entry_id) <= MAX_ID:
            raise UsageError(f"There is no generation {entry_id} in the history.")
        with closing(self._connect()) as conn, conn:
            cur = conn.execute("DELETE FROM generations WHERE id = ?", (int(entry_id),))
            if cur.rowcount == 0:
                raise UsageError(f"There is no generation {entry_id} in the history.")


COLUMNS = "id, created, generator, prompt, model, seed, recipe, outputs"


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to ``VERSION``, one migration per transaction; returns the version it was at. A
    database from a newer studio is left alone (StateError), so an older studio never damages it."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        raise sqlite3.DatabaseError(f"it was written by a newer studio (schema {version}, this one knows "
                                    f"{VERSION}); update the studio")
    for v in range(version, VERSION):
        try:
            conn.executescript("BEGIN IMMEDIATE;" + MIGRATIONS[v] + f"PRAGMA user_version = {v + 1};COMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.rollback()
            if conn.execute("PRAGMA user_version").fetchone()[0] > v:
                continue  # another process migrated it first (two studios opening an old database at once)
            raise
    return version


def _alive(pending: dict) -> bool:
    if pending.get("host") != socket.gethostname():
        return True  # another machine's process: not ours to judge
    pid = int(pending.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _finish(conn: sqlite3.Connection, entry_id: int) -> None:
    """Make a pending row ordinary; an earlier row whose file it replaced (``--overwrite``) gets
    ``replaced_by`` on that output, so no row claims content that is no longer there."""
    conn.execute("UPDATE generations SET pending = NULL WHERE id = ?", (entry_id,))
    row = conn.execute("SELECT outputs FROM generations WHERE id = ?", (entry_id,)).fetchone()
    for path in [o["path"] for o in json.loads(row[0])] if row else []:
        for other, outputs in conn.execute("SELECT id, outputs FROM generations WHERE id != ? AND pending IS NULL "
                                           "AND instr(outputs, ?) > 0", (entry_id, json.dumps(path))).fetchall():
            outs = json.loads(outputs)
            for o in outs:
                if o.get("path") == path and "replaced_by" not in o:
                    o["replaced_by"] = entry_id
            conn.execute("UPDATE generations SET outputs = ? WHERE id = ?", (json.dumps(outs), other))


def _put_in_place(files: list, outputs: list, tmps: list) -> None:
    """For a save the user asked to overwrite: the final files from its complete temporary files."""
    from engine.outputs import sha256_file

    for f, o in zip(files, outputs):
        if f.is_file() and sha256_file(f) == o["sha256"]:
            continue
        for t in tmps:
            if t.name.startswith(f".{f.name}.") and t.is_file() and sha256_file(t) == o["sha256"]:
                os.replace(t, f)
                break


def recover(conn: sqlite3.Connection) -> int:
    """Finish or undo the saves of processes that died mid-way (engine/commit.py): a pending row whose files are
    all in place with their hashes is kept; otherwise the files it linked and its temporary files are removed
    with the row. Returns how many rows it settled."""
    rows = conn.execute("SELECT id, outputs, pending FROM generations WHERE pending IS NOT NULL").fetchall()
    settled = 0
    for id_, outputs, pending in rows:
        info = json.loads(pending)
        if _alive(info):
            continue
        from engine.outputs import sha256_file

        tmps = [Path(t) for t in info.get("tmps", [])]
        files = [Path(o["path"]) for o in json.loads(outputs)]
        if info.get("overwrite"):
            try:
                _put_in_place(files, json.loads(outputs), tmps)
            except OSError:
                pass
        complete = bool(files) and all(f.is_file() and sha256_file(f) == o["sha256"]
                                       for f, o in zip(files, json.loads(outputs)))
        with conn:
            if conn.execute("SELECT pending FROM generations WHERE id = ?", (id_,)).fetchone() != (pending,):
                continue  # another process settled it meanwhile
            if complete:
                _finish(conn, id_)
            else:
                for f in files:  # a final name is ours to remove only when it is a link of our temporary file
                    try:
                        if any(t.exists() and f.exists() and os.path.samefile(f, t) for t in tmps):
                            os.unlink(f)
                    except OSError:
                        pass
                conn.execute("DELETE FROM generations WHERE id = ?", (id_,))
        for t in tmps:
            try:
                os.unlink(t)
            except OSError:
                pass
        settled += 1
    return settled


def fts_query(text: str) -> str:
    """Words as an FTS5 query that needs all of them, each as a word prefix ("tri" finds "triangle", so a search
    box can search as the user types); each word quoted, so punctuation and FTS syntax are plain text."""
    words = [w.strip("*").replace('"', '""') for w in text.split()]
    return " AND ".join(f'"{w}"*' for w in words if w) or '""'


def _entry(row) -> Entry:
    """A row as an Entry; a recipe or outputs column that is not what the studio writes (a database edited or
    damaged by hand) reads as an empty recipe with a ``damaged`` note, so one row cannot break every listing."""
    id_, created, generator, prompt, model, seed, recipe, outputs = row

    got, files = loads_as(recipe, dict), loads_as(outputs, list)
    if got is None or files is None or not all(isinstance(o, dict) for o in files):
        got, files = {"generator": generator, "damaged": f"history row {id_} is damaged (not the JSON the studio "
                                                         "writes); it cannot be replayed"}, []
    return Entry(id_, created, generator, prompt or "", model or "", seed, got, files)
