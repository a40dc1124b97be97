"""Fine-tune with LoRA from the window: pick a fine-tuner (the ones plugins register), a base model and a data
folder (a preview of its first samples), set the hyper-parameters, and watch the training and validation loss
live, the time per step and the time left, and text samples as they come.

Training runs `studio finetune KIND ... --json` in its own process (QProcess): the window never waits for it and a
crash there cannot take the window down. Stop asks it to stop as Ctrl+C does (it keeps its last checkpoint); Resume
starts it again from that checkpoint. At the end, "Use this adapter" opens the generator with the adapter selected.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from PySide6.QtCore import QProcess, QProcessEnvironment, QSize, Signal
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QListWidget,
                               QListWidgetItem, QPlainTextEdit, QSpinBox)

from engine.errors import UsageError
from studio.gui.error_banner import ErrorBanner
from studio.gui.task_dialog import TaskDialog
from studio.gui.util import button, choose_folder_into, column, guard, idle_progress, monospace, row

IMAGES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
PREVIEW_ITEMS = 8


def preview_items(folder: Path) -> list:
    """[(path, caption or text excerpt)] of the first samples of a data folder (images with .txt captions, or
    text files)."""
    folder = Path(folder)
    if folder.is_file():
        return [(folder, folder.read_text(encoding="utf-8", errors="replace")[:300])]
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGES:
            cap = p.with_suffix(".txt")
            text = cap.read_text(encoding="utf-8", errors="replace").strip() if cap.is_file() else "(no caption)"
            out.append((p, text))
        elif p.suffix.lower() == ".txt" and not any(p.with_suffix(s).exists() for s in IMAGES):
            out.append((p, p.read_text(encoding="utf-8", errors="replace")[:300]))
        if len(out) >= PREVIEW_ITEMS:
            break
    return out


class FinetuneDialog(TaskDialog):
    use_adapter = Signal(str, str, str)  # generator id, base model, adapter path

    def __init__(self, session, parent=None):
        super().__init__(parent)
        import pyqtgraph as pg

        self.session = session
        self.proc = None
        self.adapter = ""
        self.started = 0.0
        self.losses, self.vals = [], []
        self.setWindowTitle("Fine-tune (LoRA)")
        self.banner = ErrorBanner()
        self.kind = QComboBox()
        for kind, (trainer, _) in sorted(session.host.finetuners.items()):
            self.kind.addItem(f"{kind}: {trainer.title}", kind)
        self.model = QComboBox()
        self.data = QLineEdit()
        self.data.setPlaceholderText("images with same-named .txt captions, or .txt files")
        self.data.textChanged.connect(self.show_preview)
        self.steps = _spin(QSpinBox(), 1, 100000, 300, "Training steps")
        self.rank = _spin(QSpinBox(), 1, 256, 8, "LoRA rank: larger learns more, and is larger on disk")
        lr = QDoubleSpinBox()
        lr.setDecimals(5)  # before the value, which would otherwise round to 2 decimals
        lr.setSingleStep(1e-4)
        self.lr = _spin(lr, 1e-5, 1.0, 2e-3, "Learning rate")
        self.batch = _spin(QSpinBox(), 1, 1024, 8, "Samples per step")
        self.eval_every = _spin(QSpinBox(), 1, 100000, 50, "Validation loss (and a text sample) every N steps")
        self.out = QLineEdit()
        self.out.setPlaceholderText("default: the state folder's finetunes/<model>-<data>")
        self.preview = QListWidget()
        self.preview.setViewMode(QListWidget.ViewMode.IconMode)
        self.preview.setIconSize(QSize(64, 64))
        self.preview.setGridSize(QSize(150, 100))
        self.preview.setWordWrap(True)
        self.preview.setMaximumHeight(120)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "loss")
        self.plot.addLegend()
        self.train_curve = self.plot.plot([], [], pen=pg.mkPen("#3b6fd8", width=2), name="training")
        self.val_curve = self.plot.plot([], [], pen=pg.mkPen("#d8842b", width=2), symbol="o", symbolSize=6,
                                        name="validation")
        self.progress = idle_progress()
        self.timing = QLabel()
        self.sample = monospace(QPlainTextEdit(), "Text samples at every validation appear here.")
        self.sample.setMaximumHeight(70)
        self.start_button = button("Start", self.start)
        self.stop_button = button("Stop", self.stop_task, "Stop after this step; the last checkpoint is kept")
        self.resume_button = button("Resume", lambda: self.start(True), "Continue from the last checkpoint")
        self.use_button = button("Use this adapter", self.on_use)
        self.close_button = button("Close", self.accept)
        form = QFormLayout()
        form.addRow("Fine-tuner", self.kind)
        form.addRow("Base model", self.model)
        form.addRow("Data", row((self.data, 1), button("Choose…", lambda: choose_folder_into(self, "Data folder",
                                                                                             self.data))))
        form.addRow("Steps / rank", row(self.steps, self.rank, None))
        form.addRow("Learning rate / batch", row(self.lr, self.batch, None))
        form.addRow("Evaluate every", self.eval_every)
        form.addRow("Run folder", self.out)
        column(self, self.banner, form, self.preview, (self.plot, 1), self.progress, self.timing, self.sample,
               row(self.start_button, self.stop_button, self.resume_button, None, self.use_button,
                   self.close_button))
        self.kind.currentIndexChanged.connect(self.fill_models)
        self.fill_models()
        self.set_busy(False)
        self.use_button.setEnabled(False)
        self.resize(760, 760)

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details, "error")

    @guard
    def fill_models(self, *args) -> None:
        self.model.clear()
        kind = self.kind.currentData()
        for e in self.session.store.list():
            if e.generator == kind:
                self.model.addItem(f"{e.name} ({e.family})", e.name)

    @guard
    def show_preview(self, *args) -> None:
        self.preview.clear()
        for path, text in preview_items(Path(self.data.text().strip()).expanduser()):
            item = QListWidgetItem(text[:60])
            item.setToolTip(f"{path.name}\n{text}")
            if path.suffix.lower() in IMAGES:
                item.setIcon(QIcon(QPixmap(str(path))))
            self.preview.addItem(item)

    def command(self, resume: bool) -> list:
        kind, model, data = self.kind.currentData(), self.model.currentData(), self.data.text().strip()
        if not kind:
            raise UsageError("No fine-tuner is installed.")
        if not model:
            raise UsageError(f"There is no {kind} model to fine-tune; import one first.")
        if not data or not Path(data).expanduser().exists():
            raise UsageError("Choose the data folder to learn from.")
        args = [sys.executable, "-m", "studio.cli", "finetune", kind, "--model", model, "--data",
                str(Path(data).expanduser()), "--steps", str(self.steps.value()), "--rank", str(self.rank.value()),
                "--lr", f"{self.lr.value():g}", "--batch", str(self.batch.value()), "--eval-every",
                str(self.eval_every.value()), "--checkpoint-every", str(self.eval_every.value()), "--json"]
        if self.out.text().strip():
            args += ["--out", self.out.text().strip()]
        return args + (["--resume"] if resume else [])

    @guard
    def start(self, resume: bool = False) -> None:
        if self.proc is not None:
            raise UsageError("A fine-tune is already running.")
        args = self.command(resume)
        if not resume:
            self.losses, self.vals = [], []
            self.train_curve.setData([], [])
            self.val_curve.setData([], [])
        self.adapter, self.stderr = "", ""
        self.use_button.setEnabled(False)
        self.banner.hide()
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        proc.setProcessEnvironment(env)
        proc.readyReadStandardOutput.connect(self.on_stdout)
        proc.readyReadStandardError.connect(lambda: setattr(self, "stderr", self.stderr + bytes(
            proc.readAllStandardError()).decode(errors="replace")))
        proc.finished.connect(self.on_finished)
        self.proc, self.started, self._buffer = proc, time.perf_counter(), ""
        self.progress.setRange(0, self.steps.value())
        self.progress.setFormat("starting…")
        self.set_busy(True)
        proc.start(args[0], args[1:])

    def on_stdout(self) -> None:
        self._buffer += bytes(self.proc.readAllStandardOutput()).decode(errors="replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            try:
                self.on_event(json.loads(line))
            except ValueError:
                continue

    def on_event(self, e: dict) -> None:
        """One JSON line of `studio finetune --json`: a logged step, or the final adapter."""
        if "adapter" in e:
            self.adapter = e["adapter"]
            return
        if "step" not in e:
            return
        self.losses.append((e["step"], e["loss"]))
        self.train_curve.setData([s for s, _ in self.losses], [v for _, v in self.losses])
        if "val_loss" in e:
            self.vals.append((e["step"], e["val_loss"]))
            self.val_curve.setData([s for s, _ in self.vals], [v for _, v in self.vals])
        if e.get("sample"):
            self.sample.setPlainText(f"step {e['step']}: {e['sample']}")
        self.progress.setRange(0, int(e["total"]))
        self.progress.setValue(int(e["step"]))
        self.progress.setFormat(f"step {e['step']}/{e['total']}")
        self.timing.setText(f"{e['seconds_per_step']:.2f} s per step, about {_duration(e['eta_s'])} left; "
                            f"loss {e['loss']:.4f}" + (f", validation {e['val_loss']:.4f}" if "val_loss" in e else ""))

    def on_finished(self, code: int, status) -> None:
        self.proc = None
        self.set_busy(False)
        if self.adapter:
            self.progress.setFormat("done")
            self.timing.setText(f"Finished in {_duration(time.perf_counter() - self.started)}; the adapter is "
                                f"{self.adapter}")
            self.use_button.setEnabled(True)
            return
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        message = lines[-1] if lines else f"The fine-tune stopped (exit code {code})."
        self.progress.setFormat("stopped")
        self.show_error(message, self.stderr[-4000:])

    def set_busy(self, busy: bool) -> None:
        for w in (self.start_button, self.resume_button, self.kind, self.model, self.data, self.steps, self.rank,
                  self.lr, self.batch):
            w.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    def stop_task(self) -> None:
        """Stop as Ctrl+C does: the trainer keeps its last checkpoint (Resume continues from it)."""
        if self.proc is not None and self.proc.processId():
            try:
                os.kill(int(self.proc.processId()), signal.SIGINT)
            except OSError:
                self.proc.kill()

    def on_use(self) -> None:
        if self.adapter:
            self.use_adapter.emit(self.kind.currentData(), self.model.currentData(), self.adapter)
            self.accept()

    def done(self, result: int) -> None:
        if self.proc is not None:
            self.stop_task()
            if not self.proc.waitForFinished(15000):
                self.proc.kill()
        super().done(result)


def _spin(box, lo, hi, value, tip):
    box.setRange(lo, hi)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
