"""A thin Qt table model over the model store's entries."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt

from studio.gui.util import RowsTableModel

COLUMNS = ("Name", "Family", "Generator", "Size", "Hash", "ONNX exports", "Where")


class ModelTableModel(RowsTableModel):
    COLUMNS = COLUMNS

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        e = self.rows[index.row()]
        col = self.COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return {"Name": e.name, "Family": e.family, "Generator": e.generator, "Size": e.size_text,
                    "Hash": e.hash[:12], "ONNX exports": ", ".join(Path(p).name for p in e.onnx) or "—",
                    "Where": "built-in" if e.builtin else "user"}.get(col)
        if role == Qt.ItemDataRole.ToolTipRole:
            return {"Hash": e.hash, "Where": str(e.path), "ONNX exports": "\n".join(e.onnx)}.get(col, e.title)
        return None
