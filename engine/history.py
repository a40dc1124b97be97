"""History: one SQLite row per generation, with its full recipe and its output files and hashes.

The database has a schema version (``PRAGMA user_version``) and a small migration runner: ``MIGRATIONS[v]``
takes a database at version v to v + 1 in one transaction, so an older database (the studio's first ones are
version 0) is brought up to date the first time a newer studio opens it, and a crash mid-migration leaves the
old version intact. Version 1 adds an ISO 8601 timestamp, the generated text in its own column and a full-text
index (SQLite FTS5) over prompts and generated text, which ``list(search=...)`` uses.
"""
from __future__ import annotations

import datetime
import json
import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine import state
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

MIGRATIONS = [V1]  # MIGRATIONS[v]: version v -> v + 1
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
    return StateError(f"The history database {path} cannot be used ({exc}).")


class History:
    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path else state.home() / "history.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        state.ensure_dir(self.path.parent)
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=float(os.environ.get("STUDIO_HISTORY_TIMEOUT", BUSY_TIMEOUT_S)))
            conn.executescript(BASE)
            migrate(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise _problem(self.path, exc) from None
        return conn

    def add(self, recipe: dict, outputs: list) -> int:
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
                        "outputs, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (created, iso.replace("+00:00", "Z"), recipe["generator"], prompt, model, recipe.get("seed"),
                         json.dumps(recipe, sort_keys=True), json.dumps(outputs), recipe.get("text")))
                    return int(cur.lastrowid)
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    def list(self, limit: int = 50, search: str = "", generator: str = "") -> list[Entry]:
        """The newest generations; ``search``: words that must all occur in the prompt or the generated text
        (full-text over SQLite FTS5, case-insensitive, each word matching the start of a word)."""
        sql = f"SELECT {COLUMNS} FROM generations WHERE 1=1"
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
            row = conn.execute(f"SELECT {COLUMNS} FROM generations WHERE id = ?", (int(entry_id),)).fetchone()
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


def fts_query(text: str) -> str:
    """Words as an FTS5 query that needs all of them, each as a word prefix ("tri" finds "triangle", so a search
    box can search as the user types); each word quoted, so punctuation and FTS syntax are plain text."""
    words = [w.strip("*").replace('"', '""') for w in text.split()]
    return " AND ".join(f'"{w}"*' for w in words if w) or '""'


def _entry(row) -> Entry:
    id_, created, generator, prompt, model, seed, recipe, outputs = row
    return Entry(id_, created, generator, prompt or "", model or "", seed, json.loads(recipe), json.loads(outputs))
