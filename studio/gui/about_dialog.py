"""About: versions of the studio, Qt, torch and onnxruntime, and the device in use (asked of the generation
process, or checked in a worker thread)."""
from __future__ import annotations

import platform
import sys

import PySide6
from PySide6.QtCore import qVersion
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QVBoxLayout

import engine
from studio.gui.util import plain_label
from studio.gui.worker import Task


def probe_heavy() -> dict:
    """Import torch and onnxruntime in this process (slow; call off the GUI thread) and say what they see."""
    from engine.child import probe_libraries
    from studio.gui.preload import preload

    preload("torch")
    return probe_libraries()


class AboutDialog(QDialog):
    def __init__(self, parent=None, process=None):
        """``process``: the session's generation process (engine.child), asked instead of importing torch here."""
        super().__init__(parent)
        self.setWindowTitle("About GenAI Studio")
        title = QLabel("<b>GenAI Studio</b><br>An offline desktop studio for generative AI.")
        self.labels = {}
        form = QFormLayout()
        fixed = {"studio": engine.__version__, "Qt": f"{qVersion()} (PySide6 {PySide6.__version__})",
                 "Python": f"{platform.python_version()} on {sys.platform}"}
        for key, value in fixed.items():
            form.addRow(key, plain_label(value))
        for key in ("torch", "onnxruntime", "device"):
            self.labels[key] = QLabel("checking…")
            form.addRow(key, self.labels[key])
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self.task = Task(lambda report: process.probe() if process is not None else probe_heavy(), self,
                         name="about-probe")
        self.task.succeeded.connect(self.on_probe)
        self.task.failed.connect(lambda f: [l.setText(f"unknown ({f.message})") for l in self.labels.values()])
        self.task.start()

    def on_probe(self, found: dict) -> None:
        for key, label in self.labels.items():
            label.setText(found.get(key, "unknown"))

