"""The history gallery: past generations, newest first, with search, open, load recipe and delete."""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtWidgets import QLineEdit, QListView, QPlainTextEdit, QSplitter, QWidget

from engine.errors import UsageError
from studio.gui.history_model import THUMB, EntryRole, HistoryModel
from studio.gui.recipe_dialog import recipe_text
from studio.gui.util import button, column, guard, monospace, row


class HistoryPanel(QWidget):
    open_requested = Signal(object)  # engine.history.Entry
    load_requested = Signal(dict)  # a recipe

    def __init__(self, history, parent=None):
        super().__init__(parent)
        self.model = HistoryModel(history, self)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search prompts…")
        self.search.setClearButtonEnabled(True)
        self.list = QListView()
        self.list.setModel(self.model)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setUniformItemSizes(False)
        self.list.setSpacing(2)
        self.list.setWordWrap(True)
        self.recipe = monospace(QPlainTextEdit(), "Select a generation to see its full recipe.")
        self.open_button = button("Open", self.open_current)
        self.load_button = button("Load recipe", self.load_current)
        self.delete_button = button("Delete", self.delete_current)
        self.refresh_button = button("Refresh", self.refresh)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.list)
        split.addWidget(self.recipe)
        split.setSizes([300, 160])
        column(self, self.search, (split, 1), row(self.open_button, self.load_button, self.delete_button, None,
                                                  self.refresh_button), margins=(0, 0, 0, 0))
        self._debounce = QTimer(self, singleShot=True, interval=200)
        self._debounce.timeout.connect(self.refresh)
        self.search.textChanged.connect(self._debounce.start)
        self.list.selectionModel().currentChanged.connect(self.on_current)
        self.list.doubleClicked.connect(self.open_current)
        self._update_buttons()

    def set_history(self, history) -> None:
        self.model.history = history
        self.refresh()

    @guard
    def refresh(self) -> None:
        current = self.current()
        self.model.refresh(self.search.text().strip())
        if current is not None:
            for i, e in enumerate(self.model.entries):
                if e.id == current.id:
                    self.list.setCurrentIndex(self.model.index(i))
        self._update_buttons()

    def current(self):
        idx = self.list.currentIndex()
        return idx.data(EntryRole) if idx.isValid() else None

    def select_row(self, row: int) -> None:
        self.list.setCurrentIndex(self.model.index(row))

    def _update_buttons(self) -> None:
        has = self.current() is not None
        for b in (self.open_button, self.load_button, self.delete_button):
            b.setEnabled(has)
        if not has:
            self.recipe.clear()

    @guard
    def on_current(self, *args) -> None:
        e = self.current()
        self.recipe.setPlainText(recipe_text(e.recipe) if e else "")
        self._update_buttons()

    @guard
    def open_current(self, *args) -> None:
        e = self.current()
        if e is None:
            raise UsageError("Select a generation first.")
        self.open_requested.emit(e)

    @guard
    def load_current(self) -> None:
        e = self.current()
        if e is None:
            raise UsageError("Select a generation first.")
        self.load_requested.emit(dict(e.recipe))

    @guard
    def delete_current(self) -> None:
        e = self.current()
        if e is None:
            raise UsageError("Select a generation first.")
        self.model.history.delete(e.id)
        self.list.setCurrentIndex(self.model.index(-1))
        self.refresh()
