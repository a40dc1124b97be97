"""History: one SQLite row per generation, with its full recipe and its output files and hashes."""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine import state
from engine.errors import StateError, UsageError

SCHEMA = """
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


class History:
    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path else state.home() / "history.sqlite3"

    def _connect(self) -> sqlite3.Connection:
        try:
            state.ensure_dir(self.path.parent)
            conn = sqlite3.connect(self.path, timeout=10)
            conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"The history database {self.path} cannot be opened ({exc}); move it aside to start afresh.") from None
        return conn

    def add(self, recipe: dict, outputs: list) -> int:
        """Insert one generation in a single transaction; returns its id."""
        model = (recipe.get("model") or {}).get("name", "")
        with closing(self._connect()) as conn:
            try:
                with conn:  # commits, or rolls back on any error: never half a row
                    cur = conn.execute(
                        "INSERT INTO generations (created, generator, prompt, model, seed, recipe, outputs)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (recipe.get("created", time.time()), recipe["generator"], recipe.get("prompt") or "",
                         model, recipe.get("seed"), json.dumps(recipe, sort_keys=True), json.dumps(outputs)))
                    return int(cur.lastrowid)
            except sqlite3.Error as exc:
                raise StateError(f"Could not record the generation in {self.path} ({exc}).") from None

    def list(self, limit: int = 50, search: str = "", generator: str = "") -> list[Entry]:
        sql = "SELECT * FROM generations WHERE 1=1"
        args: list = []
        if search:
            sql += " AND prompt LIKE ? ESCAPE '\\'"
            args.append("%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if generator:
            sql += " AND generator = ?"
            args.append(generator)
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        args.append(int(limit))
        with closing(self._connect()) as conn:
            return [_entry(row) for row in conn.execute(sql, args)]

    def get(self, entry_id: int) -> Entry:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM generations WHERE id = ?", (int(entry_id),)).fetchone()
        if row is None:
            raise UsageError(f"There is no generation {entry_id} in the history.")
        return _entry(row)

    def delete(self, entry_id: int) -> None:
        with closing(self._connect()) as conn, conn:
            cur = conn.execute("DELETE FROM generations WHERE id = ?", (int(entry_id),))
            if cur.rowcount == 0:
                raise UsageError(f"There is no generation {entry_id} in the history.")


def _entry(row) -> Entry:
    id_, created, generator, prompt, model, seed, recipe, outputs = row
    return Entry(id_, created, generator, prompt or "", model or "", seed, json.loads(recipe), json.loads(outputs))
