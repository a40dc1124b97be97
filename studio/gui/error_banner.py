"""An error/status banner at the top of the window, with "Details" on demand."""
from __future__ import annotations

from PySide6.QtWidgets import QFrame, QPlainTextEdit, QPushButton

STYLES = {
    "error": "QFrame#banner { background: #fde2e1; border: 1px solid #e0a3a0; border-radius: 4px; }",
    "info": "QFrame#banner { background: #e3eefc; border: 1px solid #a6c1e8; border-radius: 4px; }",
}
from studio.gui.util import column, plain_label, row


class ErrorBanner(QFrame):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("banner")
        self.label = plain_label()
        self.label.setWordWrap(True)
        self.details_button = QPushButton("Details")
        self.details_button.setCheckable(True)
        self.close_button = QPushButton("✕")
        self.close_button.setFixedWidth(28)
        self.close_button.setToolTip("Dismiss")
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setMaximumHeight(160)
        self.details.hide()
        column(self, row((self.label, 1), self.details_button, self.close_button), self.details,
               margins=(8, 6, 8, 6))
        self.details_button.toggled.connect(self.details.setVisible)
        self.close_button.clicked.connect(self.hide)
        self.kind = ""
        self.hide()

    def show_message(self, message: str, details: str = "", kind: str = "error") -> None:
        self.kind = kind
        self.setStyleSheet(STYLES.get(kind, STYLES["info"]))
        self.label.setText(("⚠ " if kind == "error" else "") + message)
        self.details.setPlainText(details)
        self.details_button.setVisible(bool(details))
        self.details_button.setChecked(False)
        self.show()

    def message(self) -> str:
        return self.label.text() if self.isVisible() else ""
