"""A thin Qt list model over engine.history entries (newest first)."""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QAbstractListModel, QModelIndex, QSize, Qt
from PySide6.QtGui import QIcon, QImage, QPixmap

from studio.gui.util import default_icon

THUMB = 64
EntryRole = Qt.ItemDataRole.UserRole + 1


def first_line(text: str, limit: int = 80) -> str:
    line = next((l.strip() for l in (text or "").splitlines() if l.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


class HistoryModel(QAbstractListModel):
    def __init__(self, history, parent=None):
        super().__init__(parent)
        self.history = history
        self.entries: list = []
        self._icons: dict = {}

    def refresh(self, search: str = "", limit: int = 200) -> None:
        entries = self.history.list(limit=limit, search=search)  # read first: a damaged database raises here,
        self.beginResetModel()  # not between the begin and end of a reset (which left the view half reset)
        self.entries = entries
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.entries)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or index.row() >= len(self.entries):
            return None
        e = self.entries[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
            body = first_line(e.recipe.get("text") or "") if e.recipe.get("text") else ""
            lines = [first_line(e.prompt) or "(no prompt)", f"{e.generator} · seed {e.seed} · {when}"]
            if body:
                lines.insert(1, "→ " + body)
            return "\n".join(lines)
        if role == Qt.ItemDataRole.DecorationRole:
            return self._icon(e)
        if role == Qt.ItemDataRole.ToolTipRole:
            return e.prompt or e.recipe.get("text", "")
        if role == EntryRole:
            return e
        return None

    def _icon(self, e) -> QIcon:
        if e.id in self._icons:
            return self._icons[e.id]
        icon = None
        png = next((o["path"] for o in e.outputs if str(o.get("path", "")).lower().endswith(".png")), None)
        if png and Path(png).exists():
            image = QImage(png)
            if not image.isNull():
                scaled = image.scaled(QSize(THUMB, THUMB), Qt.AspectRatioMode.KeepAspectRatio,
                                      Qt.TransformationMode.FastTransformation)
                icon = QIcon(QPixmap.fromImage(scaled))
        if icon is None:
            kind = "image" if png else ("audio" if any(str(o.get("path", "")).endswith((".wav", ".flac"))
                                                       for o in e.outputs) else "text")
            icon = default_icon(e.generator, kind, THUMB)
        self._icons[e.id] = icon
        return icon
