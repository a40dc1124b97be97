"""The model manager: models with family, size, hash and ONNX exports; import a folder; remove a user model."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QInputDialog, QMessageBox

from engine.errors import UsageError
from studio.gui.error_banner import ErrorBanner
from studio.gui.model_table import ModelTableModel
from studio.gui.util import button, column, guard, row, row_table, with_folder
from studio.gui.task_dialog import TaskDialog


class ModelDialog(TaskDialog):
    models_changed = Signal()

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.setWindowTitle("Models")
        self.banner = ErrorBanner()
        self.model = ModelTableModel()
        self.table = row_table(self.model)
        self.import_button = button("Import folder…", self.on_import)
        self.remove_button = button("Remove", self.on_remove)
        self.close_button = button("Close", self.accept)
        column(self, self.banner, (self.table, 1),
               row(self.import_button, self.remove_button, None, self.close_button))
        self.resize(820, 380)
        self.refresh()

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details, "error")

    @guard
    def refresh(self) -> None:
        self.model.set_rows(self.session.store.list())

    def selected(self):
        idx = self.table.currentIndex()
        return self.model.rows[idx.row()] if idx.isValid() else None

    @guard
    def on_import(self) -> None:
        with_folder(self, "Model folder (config.json, model.safetensors, ...)", self.import_folder)

    @guard
    def import_folder(self, path: str, name: str | None = None) -> None:
        if self.task is not None:
            raise UsageError("An import is already running.")
        store = self.session.store
        name = name or store.import_name(Path(path))
        while store.name_problem(name):  # taken or not a valid name: the user names it (the CLI has --name)
            name = self.ask_name(store.name_problem(name), store.free_name(name))
            if name is None:
                return
        self.banner.show_message(f"Importing {Path(path).name}… (checking and copying the weights)", kind="info")
        self.start_task(lambda report: store.import_(Path(path), name=name), "import-model", self._imported,
                        lambda f: self.show_error(f"Import failed: {f.message}", f.details))

    def ask_name(self, problem: str, suggestion: str) -> str | None:
        """Another name for the model being imported (None: the user cancelled)."""
        text, ok = QInputDialog.getText(self, "Name the model", f"{problem}\nName for this model:",
                                        text=suggestion)
        return text.strip() if ok else None

    def set_busy(self, busy: bool) -> None:
        self.import_button.setEnabled(not busy)

    @guard
    def _imported(self, entry) -> None:
        self.banner.show_message(f"Imported {entry.name} ({entry.family}).", kind="info")
        self.refresh()
        self.models_changed.emit()

    @guard
    def on_remove(self) -> None:
        entry = self.selected()
        if entry is None:
            raise UsageError("Select a model first.")
        if entry.builtin:
            raise UsageError(f"{entry.name} is a built-in model and cannot be removed.")
        answer = QMessageBox.question(self, "Remove model?", f"Delete the model {entry.name} and its files?")
        if answer == QMessageBox.StandardButton.Yes:
            self.remove(entry.name)

    def remove(self, name: str) -> None:
        self.session.store.remove(name)
        self.refresh()
        self.models_changed.emit()
        self.banner.show_message(f"Removed {name}.", kind="info")

