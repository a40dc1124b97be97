"""Settings: default device, backend and output folder (engine.state.Settings)."""
from __future__ import annotations

from PySide6.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLineEdit

from engine.generators import BACKENDS, DEVICES
from studio.gui.util import button, choose_folder_into, column, guard, row


class SettingsDialog(QDialog):
    def __init__(self, settings, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setCurrentText(settings.device if settings.device in DEVICES else "auto")
        self.backend = QComboBox()
        self.backend.addItems(BACKENDS)
        self.backend.setCurrentText(settings.backend if settings.backend in BACKENDS else "auto")
        self.output_dir = QLineEdit(settings.output_dir)
        self.output_dir.setPlaceholderText(str(settings.outputs))
        form = QFormLayout()
        form.addRow("Default device", self.device)
        form.addRow("Default backend", self.backend)
        form.addRow("Output folder", row((self.output_dir, 1), button("Browse…", self.on_browse)))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        column(self, form, buttons)
        self.resize(520, 160)

    @guard
    def on_browse(self) -> None:
        choose_folder_into(self, "Output folder", self.output_dir)

    def apply(self, settings) -> None:
        settings.device = self.device.currentText()
        settings.backend = self.backend.currentText()
        settings.output_dir = self.output_dir.text().strip()
