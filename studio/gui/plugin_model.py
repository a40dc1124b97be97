"""A thin Qt table model over the plugin host's PluginStatus records."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor

from studio.gui.util import RowsTableModel

COLUMNS = ("Enabled", "Plugin", "Version", "Source", "Status", "Generators", "Error")
STATUS_COLOURS = {"loaded": "#2f9e5b", "disabled": "#777777", "failed": "#c5221f"}


class PluginTableModel(RowsTableModel):
    COLUMNS = COLUMNS

    def __init__(self, host, parent=None):
        super().__init__(host.plugins.values(), parent)
        self.pending: dict = {}  # name -> enabled, changed in this dialog and saved to settings

    def enabled(self, row: int) -> bool:
        p = self.rows[row]
        return self.pending.get(p.name, p.status != "disabled")

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        p = self.rows[index.row()]
        col = COLUMNS[index.column()]
        if role == Qt.ItemDataRole.CheckStateRole and col == "Enabled":
            return Qt.CheckState.Checked if self.enabled(index.row()) else Qt.CheckState.Unchecked
        if role == Qt.ItemDataRole.DisplayRole:
            status = p.status + (" (restart or reload)" if p.name in self.pending else "")
            return {"Plugin": p.name, "Version": p.version, "Source": p.source, "Status": status,
                    "Generators": ", ".join(p.generators), "Error": p.error.splitlines()[0] if p.error else ""
                    }.get(col)
        if role == Qt.ItemDataRole.ForegroundRole and col == "Status":
            return QColor(STATUS_COLOURS.get(p.status, "#000000"))
        if role == Qt.ItemDataRole.ToolTipRole:
            return p.error or p.location
        return None

    def flags(self, index):
        base = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
        if index.isValid() and COLUMNS[index.column()] == "Enabled":
            base |= Qt.ItemFlag.ItemIsUserCheckable
        return base

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole):
        if role != Qt.ItemDataRole.CheckStateRole or COLUMNS[index.column()] != "Enabled":
            return False
        enabled = Qt.CheckState(value) == Qt.CheckState.Checked if not isinstance(value, bool) else value
        self.set_enabled(index.row(), enabled)
        return True

    def set_enabled(self, row: int, enabled: bool) -> None:
        from engine.plugins import set_enabled

        p = self.rows[row]
        set_enabled(p.name, enabled)
        if enabled == (p.status != "disabled"):
            self.pending.pop(p.name, None)
        else:
            self.pending[p.name] = enabled
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(COLUMNS) - 1))
