"""A read-only dialog that shows a recipe as formatted JSON."""
from __future__ import annotations

import json

from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QPlainTextEdit, QVBoxLayout

from studio.gui.util import breakable


def recipe_text(recipe: dict) -> str:
    """A recipe as indented JSON, for reading (a long prompt or result shown broken: ``breakable``)."""
    return breakable(json.dumps(recipe, indent=2, sort_keys=True, default=str))


class RecipeDialog(QDialog):
    def __init__(self, recipe: dict, parent=None, title: str = "Recipe"):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.text = QPlainTextEdit(recipe_text(recipe))
        self.text.setReadOnly(True)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.text)
        lay.addWidget(buttons)
        self.resize(560, 520)
