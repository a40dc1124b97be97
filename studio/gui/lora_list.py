"""The LoRA adapters of a generation (for generators that apply them): files or PEFT folders, each with a weight;
what `--lora FILE[:WEIGHT]` does on the command line."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QDoubleSpinBox, QFileDialog, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

from studio.gui.util import button, column, guard, row


class LoraList(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["LoRA", "Weight"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().hide()
        self.table.setMaximumHeight(110)
        self.add_button = button("Add LoRA…", self.on_add, "A LoRA file (.safetensors, kohya or PEFT) or a PEFT "
                                                            "adapter folder")
        self.remove_button = button("Remove", self.remove_selected)
        column(self, self.table, row(self.add_button, self.remove_button, None), margins=(0, 0, 0, 0))

    @guard
    def on_add(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "LoRA file", "", "LoRA (*.safetensors);;All files (*)")
        if path:
            self.add(path)

    def add(self, path, weight: float = 1.0) -> None:
        """Add (or re-weight) an adapter."""
        path = str(path)
        for r in range(self.table.rowCount()):
            if self.table.item(r, 0).data(256) == path:
                self.table.cellWidget(r, 1).setValue(weight)
                return
        r = self.table.rowCount()
        self.table.insertRow(r)
        item = QTableWidgetItem(Path(path).name)
        item.setData(256, path)  # Qt.UserRole
        item.setToolTip(path)
        self.table.setItem(r, 0, item)
        spin = QDoubleSpinBox()
        spin.setRange(-10.0, 10.0)
        spin.setSingleStep(0.05)
        spin.setValue(weight)
        self.table.setCellWidget(r, 1, spin)

    def remove_selected(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedIndexes()}, reverse=True) or \
            ([self.table.rowCount() - 1] if self.table.rowCount() else [])
        for r in rows:
            self.table.removeRow(r)

    def clear(self) -> None:
        self.table.setRowCount(0)

    def specs(self) -> list:
        """["PATH:WEIGHT", ...] for the job."""
        return [f"{self.table.item(r, 0).data(256)}:{self.table.cellWidget(r, 1).value():g}"
                for r in range(self.table.rowCount())]

    def set_specs(self, loras: list) -> None:
        """From a recipe's ``loras`` ([{"path", "weight"}, ...])."""
        self.clear()
        for a in loras or []:
            self.add(a.get("path", ""), float(a.get("weight", 1.0)))
