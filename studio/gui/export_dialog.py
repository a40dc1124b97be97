"""The ONNX export dialog: pick a model, optional int8 or int4 weights, progress, then parity figures and the output
folder."""
from __future__ import annotations

import json

from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QCheckBox, QComboBox, QFormLayout, QPlainTextEdit

from engine.errors import UsageError
from studio.gui.error_banner import ErrorBanner
from studio.gui.util import button, column, guard, idle_progress, monospace, plain_label, row
from studio.gui.task_dialog import TaskDialog

PASS_KEYS = ("passed", "ok", "pass")


def gate_passed(parity) -> bool | None:
    """True/False when the parity figures say whether the gate passed (at any depth), None when they do not say."""
    if isinstance(parity, dict):
        found = [parity[k] for k in PASS_KEYS if isinstance(parity.get(k), bool)]
        if found:
            return all(found)
        nested = [gate_passed(v) for v in parity.values() if isinstance(v, (dict, list))]
        nested = [n for n in nested if n is not None]
        return all(nested) if nested else None
    if isinstance(parity, list):
        nested = [n for n in (gate_passed(v) for v in parity) if n is not None]
        return all(nested) if nested else None
    return None


def format_parity(parity) -> str:
    """The parity figures as indented 'key: value' lines (numbers in short scientific form)."""
    lines = []

    def walk(obj, indent):
        pad = "  " * indent
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, (dict, list)):
                    lines.append(f"{pad}{k}:")
                    walk(v, indent + 1)
                else:
                    lines.append(f"{pad}{k}: {_fmt(v)}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, (dict, list)):
                    lines.append(f"{pad}[{i}]")
                    walk(v, indent + 1)
                else:
                    lines.append(f"{pad}- {_fmt(v)}")
        else:
            lines.append(f"{pad}{_fmt(obj)}")

    walk(parity, 0)
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


class ExportDialog(TaskDialog):
    def __init__(self, session, parent=None, model: str = ""):
        super().__init__(parent)
        self.session = session
        self.manifest = None
        self.setWindowTitle("Export to ONNX")
        self.banner = ErrorBanner()
        self.model = QComboBox()
        try:
            for e in session.store.list():
                self.model.addItem(f"{e.name} ({e.family})", e.name)
        except Exception as exc:  # noqa: BLE001
            self.banner.show_message(f"Listing models failed: {exc}")
        if model:
            self.model.setCurrentIndex(max(0, self.model.findData(model)))
        self.quantize = QComboBox()
        for label, scheme in (("none (fp32: exact)", None), ("int8 weights (smaller, faster on the CPU, slightly "
                                                             "less exact)", "int8"),
                              ("int4 weights (smallest, least exact)", "int4")):
            self.quantize.addItem(label, scheme)
        self.quantize.setToolTip("Quantized graphs are compared with the fp32 graph and refused when they differ "
                                 "by more than their stated tolerance")
        self.force = QCheckBox("Keep the export even if it fails the parity gate")
        self.progress = idle_progress()
        self.result = plain_label()
        self.result.setObjectName("export_result")
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.parity = plain_label()
        self.parity.setObjectName("export_parity")
        monospace(self.parity).setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.parity.setWordWrap(True)
        self.log = monospace(QPlainTextEdit(), "Export log and parity figures appear here.")
        self.export_button = button("Export", self.start)
        self.close_button = button("Close", self.accept)
        form = QFormLayout()
        form.addRow("Model", self.model)
        form.addRow("Quantize", self.quantize)
        form.addRow("", self.force)
        column(self, self.banner, form, self.progress, self.result, self.parity, (self.log, 1),
               row(None, self.export_button, self.close_button))
        self.model.setEnabled(self.model.count() > 0)
        self.export_button.setEnabled(self.model.count() > 0)
        if self.model.count() == 0:
            self.result.setText("There is no model to export yet.")
        self.resize(640, 480)

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details, "error")

    @guard
    def start(self) -> None:
        if self.task is not None:
            raise UsageError("An export is already running.")
        name = self.model.currentData()
        if not name:
            raise UsageError("Choose a model to export.")
        entry = self.session.store.get(name)
        host = self.session.host
        quantize = self.quantize.currentData()
        force = self.force.isChecked()
        self.banner.hide()
        self.manifest = None
        self.log.clear()
        self.parity.clear()
        self.result.setText(f"Exporting {name}…")
        self.result.setStyleSheet("")
        self.progress.setRange(0, 0)
        self.progress.setFormat("exporting…")
        self.export_button.setEnabled(False)

        process = self.session.process

        def run(report):
            if process is not None:  # in the generation process, so torch and the tracer never stall the window
                return process.export(entry.name, quantize, force,
                                      lambda m: report(m["text"]) if m.get("type") == "log" else None)
            try:
                from engine.onnx_export import export_model
            except ImportError as exc:
                raise UsageError(f"ONNX export is not available in this installation ({exc}).") from None
            return export_model(host, entry, quantize=quantize, force=force, log=lambda m: report(str(m)))

        self.start_task(run, "export-onnx", self.on_done, self.on_failed, self.log.appendPlainText)

    def set_busy(self, busy: bool) -> None:
        self.export_button.setEnabled(not busy)

    @guard
    def on_done(self, manifest) -> None:
        self.manifest = manifest or {}
        parity = self.manifest.get("parity", {})
        passed = self.manifest.get("parity_passed")
        passed = gate_passed(parity) if not isinstance(passed, bool) else passed
        folder = self.manifest.get("folder", "")
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        if passed is False:
            self.progress.setFormat("parity gate FAILED")
            self.result.setText(f"⚠ The export does NOT match PyTorch within tolerance (parity gate failed).\n"
                                f"Kept because you asked: {folder}")
            self.result.setStyleSheet("color: #c5221f; font-weight: bold;")
        else:
            self.progress.setFormat("done")
            self.result.setText(f"✔ Exported; the parity gate passed.\nFolder: {folder}" if passed else
                                f"Exported.\nFolder: {folder}")
            self.result.setStyleSheet("color: #2f9e5b; font-weight: bold;")
        self.parity.setText("Parity with PyTorch:\n" + format_parity(parity))
        graphs = self.manifest.get("graphs")
        if isinstance(graphs, dict):
            files = [f"  {name}: {g.get('file', '')}" if isinstance(g, dict) else f"  {name}" for name, g in graphs.items()]
            self.log.appendPlainText("\nGraphs:\n" + "\n".join(files))
        self.log.appendPlainText("\nManifest:\n" + json.dumps(
            {k: v for k, v in self.manifest.items() if k not in ("parity", "graphs", "config")}, indent=2,
            default=str)[:4000])
        self.log.moveCursor(QTextCursor.MoveOperation.Start)

    @guard
    def on_failed(self, failure) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        gate = failure.error == "ParityError"
        self.progress.setFormat("parity gate FAILED" if gate else ("cancelled" if failure.cancelled else "failed"))
        self.result.setText(("⚠ Parity gate failed: " if gate else "⚠ Export failed: ") + failure.message)
        self.result.setStyleSheet("color: #c5221f; font-weight: bold;")
        self.show_error(failure.message, failure.details)

