"""A thin Qt table model over the model store's entries."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt

from studio.gui.util import human_size

COLUMNS = ("Name", "Family", "Generator", "Size", "Hash", "ONNX exports", "Where")


class ModelTableModel(QAbstractTableModel):
    def __init__(self, entries=(), parent=None):
        super().__init__(parent)
        self.entries = list(entries)

    def set_entries(self, entries) -> None:
        self.beginResetModel()
        self.entries = list(entries)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.entries)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        e = self.entries[index.row()]
        col = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return {"Name": e.name, "Family": e.family, "Generator": e.generator, "Size": human_size(e.size_bytes),
                    "Hash": e.hash[:12], "ONNX exports": ", ".join(Path(p).name for p in e.onnx) or "—",
                    "Where": "built-in" if e.builtin else "user"}.get(col)
        if role == Qt.ItemDataRole.ToolTipRole:
            return {"Hash": e.hash, "Where": str(e.path), "ONNX exports": "\n".join(e.onnx)}.get(col, e.title)
        return None
