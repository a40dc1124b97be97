"""About: versions of the studio, Qt, torch and onnxruntime, and the device in use (checked in a worker)."""
from __future__ import annotations

import platform
import sys

import PySide6
from PySide6.QtCore import qVersion
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QVBoxLayout

import engine
from studio.gui.worker import Task


def probe_heavy() -> dict:
    """Import torch and onnxruntime (slow; call off the GUI thread) and say what they see."""
    out = {}
    try:
        from studio.gui.preload import preload

        preload("torch")
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
        else:
            out["device"] = f"cpu ({torch.get_num_threads()} threads)"
    except Exception as exc:  # noqa: BLE001
        out["torch"] = f"not available ({exc})"
        out["device"] = "cpu"
    try:
        import onnxruntime

        out["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except Exception as exc:  # noqa: BLE001
        out["onnxruntime"] = f"not available ({exc})"
    return out


class AboutDialog(QDialog):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("About GenAI Studio")
        title = QLabel("<b>GenAI Studio</b><br>An offline desktop studio for generative AI.")
        self.labels = {}
        form = QFormLayout()
        fixed = {"studio": engine.__version__, "Qt": f"{qVersion()} (PySide6 {PySide6.__version__})",
                 "Python": f"{platform.python_version()} on {sys.platform}"}
        for key, value in fixed.items():
            form.addRow(key, QLabel(value))
        for key in ("torch", "onnxruntime", "device"):
            self.labels[key] = QLabel("checking…")
            form.addRow(key, self.labels[key])
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self.task = Task(lambda report: probe_heavy(), self, name="about-probe")
        self.task.succeeded.connect(self.on_probe)
        self.task.failed.connect(lambda f: [l.setText(f"unknown ({f.message})") for l in self.labels.values()])
        self.task.start()

    def on_probe(self, found: dict) -> None:
        for key, label in self.labels.items():
            label.setText(found.get(key, "unknown"))

