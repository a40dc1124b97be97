"""The history gallery: past generations, newest first, with search, open, load recipe and delete."""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (QHBoxLayout, QLineEdit, QListView, QPlainTextEdit, QPushButton, QSplitter,
                               QVBoxLayout, QWidget)

from engine.errors import UsageError
from studio.gui.history_model import THUMB, EntryRole, HistoryModel
from studio.gui.recipe_dialog import recipe_text
from studio.gui.util import guard


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
        self.recipe = QPlainTextEdit()
        self.recipe.setReadOnly(True)
        self.recipe.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.recipe.setPlaceholderText("Select a generation to see its full recipe.")
        self.open_button = QPushButton("Open")
        self.load_button = QPushButton("Load recipe")
        self.delete_button = QPushButton("Delete")
        self.refresh_button = QPushButton("Refresh")
        buttons = QHBoxLayout()
        for b in (self.open_button, self.load_button, self.delete_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.refresh_button)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.list)
        split.addWidget(self.recipe)
        split.setSizes([300, 160])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.search)
        lay.addWidget(split, 1)
        lay.addLayout(buttons)
        self._debounce = QTimer(self, singleShot=True, interval=200)
        self._debounce.timeout.connect(self.refresh)
        self.search.textChanged.connect(self._debounce.start)
        self.list.selectionModel().currentChanged.connect(self.on_current)
        self.list.doubleClicked.connect(self.open_current)
        self.open_button.clicked.connect(self.open_current)
        self.load_button.clicked.connect(self.load_current)
        self.delete_button.clicked.connect(self.delete_current)
        self.refresh_button.clicked.connect(self.refresh)
        self._update_buttons()

    def set_history(self, history) -> None:
        self.model.history = history
        self.refresh()

    @guard
    def refresh(self) -> None:
        current = self.current()
        self.model.refresh(self.search.text().strip())
        if current is not None:
            for row, e in enumerate(self.model.entries):
                if e.id == current.id:
                    self.list.setCurrentIndex(self.model.index(row))
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
