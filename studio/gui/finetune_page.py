"""The fine-tune page (Tools > Fine-tune (LoRA)…): LoRA on a model from a dataset folder, with a live loss plot.

Left: the fine-tuner (from the plugins' ``register_finetuners``), the base model, the dataset folder with a preview
of a few samples, and the fine-tuner's hyper-parameters (its Option specs, in the form generators use). Right: the
training and validation loss as they arrive (pyqtgraph), time per step and time left, the samples the fine-tuner
draws at each evaluation, and at the end "Use this adapter", which opens the generator with it selected.

The training runs in its own process (studio/gui/finetune_process.py); this page only reads its JSON lines.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSizePolicy, QSplitter,
                               QStackedWidget, QVBoxLayout, QWidget)

from engine import state
from engine.errors import UsageError
from engine.runfolder import unfinished
from studio.gui.dataset_preview import DatasetPreview
from studio.gui.error_banner import ErrorBanner
from studio.gui.finetune_process import FinetuneProcess, command_args
from studio.gui.option_form import OptionForm
from studio.gui.util import button, guard, plain_label

TRAIN_PEN = pg.mkPen("#9bb8ee", width=1)
MEAN_PEN = pg.mkPen("#2456b8", width=2)
SMOOTH = 10  # the training curve's running mean, over this many steps (one batch's loss is noisy)
VAL_PEN = pg.mkPen("#e0762b", width=2)
SAMPLE_SCALE = 4  # the shapes model's 32-pixel samples, shown 4x with nearest-neighbour pixels

log = logging.getLogger(__name__)


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def checkpoint_state(run_dir) -> dict:
    """The run folder's last checkpoint ({"step", "history"}), or {} when it has none or it is not what a run
    writes (a damaged file must not stop the page from opening)."""
    try:
        state_ = json.loads((Path(run_dir) / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(state_, dict) or isinstance(state_.get("step"), bool) or \
            not isinstance(state_.get("step", 0), int):
        return {}
    history = state_.get("history", [])
    ok = isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int) and
                                           isinstance(h.get("loss"), (int, float)) and
                                           isinstance(h.get("val_loss", 0.0), (int, float)) for h in history)
    return {**state_, "history": history if ok else []}


class FinetunePage(QWidget):
    use_adapter = Signal(str, str, str)  # generator id, base model name, adapter path

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.setWindowTitle("Fine-tune — GenAI Studio")
        self.process = FinetuneProcess(self)
        self.process.progress.connect(self.on_progress)
        self.process.succeeded.connect(self.on_succeeded)
        self.process.failed.connect(self.on_failed)
        self.run = None  # the current run: kind, model, data, options, folder
        self.adapter = ""
        self.points: dict = {"train": ([], []), "val": ([], []), "mean": []}

        self.banner = ErrorBanner()
        self.finetuner = QComboBox()
        self.finetuner.setObjectName("finetuner")
        self.model = QComboBox()
        self.model.setObjectName("base_model")
        self.data = QLineEdit()
        self.data.setObjectName("dataset")
        self.browse = QPushButton("Browse…")
        self.caption_button = button("Caption them…", self.caption_dataset, "Write the missing captions with a "
                                     "caption model (Tools > Caption a folder…), then train", "caption_dataset")
        self.caption_button.hide()
        data_row = QHBoxLayout()
        data_row.addWidget(self.data, 1)
        data_row.addWidget(self.browse)
        data_row.addWidget(self.caption_button)
        self.preview = DatasetPreview()
        setup = QGroupBox("What to fine-tune")
        sf = QFormLayout(setup)
        sf.addRow("Fine-tuner", self.finetuner)
        sf.addRow("Base model", self.model)
        sf.addRow("Dataset", data_row)
        sf.addRow(self.preview)
        self.form = OptionForm()
        self.defaults = QPushButton("Defaults")
        hyper = QGroupBox("Hyper-parameters")
        hl = QVBoxLayout(hyper)
        hl.addWidget(self.form)
        hl.addWidget(self.defaults, 0, Qt.AlignmentFlag.AlignRight)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.addWidget(setup)
        ll.addWidget(hyper)
        ll.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(left)
        scroll.setMinimumWidth(400)

        self.plot = pg.PlotWidget(background="w")
        self.plot.setObjectName("loss_plot")
        self.plot.setMinimumHeight(240)
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "step")
        self.plot.setLabel("left", "loss (log scale)")
        self.plot.setLogMode(y=True)  # a diffusion loss spikes, a text loss falls by decades: both stay readable
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        self.plot.addLegend(offset=(-10, 10))
        self.train_curve = self.plot.plot([], [], pen=TRAIN_PEN, name="training")
        self.mean_curve = self.plot.plot([], [], pen=MEAN_PEN, name=f"training, mean of {SMOOTH} steps")
        self.val_curve = self.plot.plot([], [], pen=VAL_PEN, symbol="o", symbolSize=7, symbolBrush="#e0762b",
                                        name="validation")
        self.stats = QLabel("Not started.")
        self.stats.setObjectName("finetune_stats")
        self.stats.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.sample_title = QLabel("Samples")
        self.sample_title.setStyleSheet("font-weight: bold;")
        self.sample_image = QLabel("The samples of each evaluation appear here.")
        self.sample_image.setObjectName("sample_image")
        self.sample_image.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.sample_image.setMinimumHeight(140)
        self.sample_text = QPlainTextEdit()
        self.sample_text.setObjectName("sample_text")
        self.sample_text.setReadOnly(True)
        self.sample_text.setPlaceholderText("The samples of each evaluation appear here.")
        self.samples = QStackedWidget()
        self.samples.addWidget(self.sample_image)
        self.samples.addWidget(self.sample_text)
        self.start_button = button("Start", self.start, name="start")
        self.start_button.setDefault(True)
        self.pause_button = button("Pause", self.pause, "Stop after the current step, with a checkpoint there; Resume "
                                   "continues", "pause")
        self.resume_button = button("Resume", self.resume, "Continue the last run from its checkpoint", "resume")
        self.cancel_button = button("Cancel", self.cancel, "Stop at once; the last periodic checkpoint stays, so Resume "
                                    "still works", "cancel")
        self.use_button = button("Use this adapter", self.on_use_adapter, "Open the generator with the base model and "
                                 "this adapter selected", "use_adapter")
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.resume_button, self.cancel_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.use_button)
        self.run_label = plain_label()
        self.run_label.setObjectName("run_folder")
        self.run_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)  # long paths never widen
        self.run_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.addWidget(self.plot, 3)
        rl.addWidget(self.stats)
        rl.addWidget(self.progress)
        rl.addWidget(self.sample_title)
        rl.addWidget(self.samples, 2)
        rl.addWidget(self.run_label)
        rl.addLayout(buttons)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(scroll)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([430, 690])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.banner)
        lay.addWidget(split, 1)

        self.finetuner.currentIndexChanged.connect(self.on_finetuner_changed)
        self.browse.clicked.connect(self.on_browse)
        self.data.editingFinished.connect(self.refresh_preview)
        self.defaults.clicked.connect(self.form.reset)
        self.populate()
        gui = session.settings.gui if isinstance(session.settings.gui, dict) else {}
        try:
            self.restore_run(gui.get("finetune_run"))
        except Exception:  # noqa: BLE001 - what an earlier session left is a convenience, never a reason not to open
            log.warning("The fine-tune run of an earlier session could not be shown again", exc_info=True)
            self.run = None
        self._buttons()

    def show_error(self, message: str, details: str = "") -> None:  # where studio.gui.util.guard reports
        self.banner.show_message(message, details)

    # ----- setup -------------------------------------------------------------------------------
    def finetuners(self) -> dict:
        return {kind: t for kind, (t, _) in self.session.host.finetuners.items()}

    def trainer(self):
        return self.finetuners().get(self.finetuner.currentData())

    def populate(self) -> None:
        self.finetuner.blockSignals(True)
        self.finetuner.clear()
        for kind, t in self.finetuners().items():
            self.finetuner.addItem(f"{kind}: {t.title}", kind)
        self.finetuner.blockSignals(False)
        if not self.finetuner.count():
            self.banner.show_message("No fine-tuner is installed: no plugin registers one (see Tools > Plugins).")
        self.on_finetuner_changed()

    @guard
    def on_finetuner_changed(self, *args) -> None:
        t = self.trainer()
        self.form.set_options(t.options if t else ())
        self.model.clear()
        gen = self.session.host.generators.get(t.generator) if t else None
        if gen is not None:
            for e in self.session.models_for(gen[0].info):
                self.model.addItem(f"{e.title or e.name} ({e.family}{', built-in' if e.builtin else ''})", e.name)
        if not self.model.count():
            self.model.addItem("(no model for this fine-tuner: import one in Models…)", "")
        self.samples.setCurrentWidget(self.sample_text)  # until samples arrive: text, or pictures (on_progress)
        self.data.setPlaceholderText("a folder of images with same-named .txt captions" if t and t.data == "images"
                                     else "a folder of .txt files, or one .txt file")
        if self.data.text().strip():
            self.refresh_preview()

    @guard
    def on_browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the dataset folder", self.data.text())
        if folder:
            self.set_dataset(folder)

    def set_dataset(self, folder: str) -> None:
        self.data.setText(str(folder))
        self.refresh_preview()

    @guard
    def refresh_preview(self) -> None:
        t, path = self.trainer(), self.data.text().strip()
        if t is None or not path:
            self.preview.clear("Choose a dataset folder to see a few of its samples.")
            return
        self.banner.hide()
        self.caption_button.hide()
        try:
            self.preview.show_folder(path, t.data)
        except UsageError as exc:
            missing = self.preview.missing_captions
            self.preview.clear("This folder cannot be trained on.")
            self.banner.show_message(str(exc))
            self.caption_button.setVisible(bool(missing))  # the offer: write them with a caption model

    @guard
    def caption_dataset(self) -> None:
        """The caption-a-folder dialog on this dataset; the preview is read again when it closes."""
        from studio.gui.caption_folder_dialog import CaptionFolderDialog

        CaptionFolderDialog(self.session, self, folder=self.data.text().strip()).exec()
        self.refresh_preview()

    # ----- running -----------------------------------------------------------------------------
    def busy(self) -> bool:
        return self.process.running()

    def _buttons(self) -> None:
        busy = self.busy()
        resumable = bool(self.run) and not busy and not self.adapter and \
            (Path(self.run["folder"]) / "checkpoint").is_dir()
        self.start_button.setEnabled(not busy)
        self.pause_button.setEnabled(busy)
        self.cancel_button.setEnabled(busy)
        self.resume_button.setEnabled(resumable)
        self.use_button.setEnabled(bool(self.adapter) and not busy)
        for w in (self.finetuner, self.model, self.data, self.browse, self.form, self.defaults):
            w.setEnabled(not busy)

    def load_recipe(self, recipe: dict) -> None:
        """A history row's fine-tune back in the form: its fine-tuner, base model, dataset and hyper-parameters,
        ready to run again (Start makes a new run folder)."""
        args = recipe.get("args") or {}
        self._show_settings(recipe.get("kind"), args.get("model"), args.get("data", ""), args)

    def _show_settings(self, kind, model, data, options: dict) -> None:
        index = self.finetuner.findData(kind)
        if index < 0:
            raise UsageError(f"This fine-tune needs the fine-tuner {kind!r}, which is not installed.")
        self.finetuner.setCurrentIndex(index)
        found = self.model.findData(model)
        if found >= 0:
            self.model.setCurrentIndex(found)
        self.set_dataset(str(data))
        self.form.set_values({o.name: options[o.name] for o in self.trainer().options if o.name in options})

    def unfinished_run(self):
        """The run to offer again after a restart (kept in the window's settings): one with a checkpoint that has
        not finished; None when there is none."""
        r = self.run
        return dict(r) if r and not self.adapter and unfinished(r.get("folder")) else None

    def restore_run(self, saved) -> None:
        """An unfinished run of an earlier session (``unfinished_run``): its settings in the form, its loss curve
        up to the checkpoint, and Resume ready to continue it."""
        keys = ("kind", "generator", "data_kind", "model", "data", "folder")
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), str) for k in keys) or \
                not isinstance(saved.get("options"), dict) or not unfinished(saved["folder"]):
            return
        try:
            self._show_settings(saved["kind"], saved["model"], saved["data"], saved["options"])
        except UsageError:  # its fine-tuner is gone: nothing to resume it with
            return
        self.run = saved
        ck = checkpoint_state(saved["folder"])
        for h in ck.get("history", []):
            self._add_point(h)
        self.run_label.setText(f"Run folder: {saved['folder']}")
        self.stats.setText(f"This run stopped at step {ck.get('step', 0)} when the studio closed; Resume "
                           "continues it.")

    @guard
    def start(self) -> None:
        """A new run from the form, in a new run folder."""
        if self.busy():
            return
        t = self.trainer()
        if t is None:
            raise UsageError("No fine-tuner is installed.")
        model, data = self.model.currentData(), self.data.text().strip()
        if not model:
            raise UsageError(f"Choose a base model; no {t.generator} model is installed.")
        if not data:
            raise UsageError("Choose a dataset folder first.")
        self.banner.hide()
        self.preview.show_folder(data, t.data)  # the same check the run makes, before starting a process
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = state.home() / "finetunes" / f"{model}-{Path(data).stem}-{stamp}"
        n = 1
        while folder.exists():
            n += 1
            folder = folder.with_name(f"{model}-{Path(data).stem}-{stamp}-{n}")
        self.run = {"kind": self.finetuner.currentData(), "generator": t.generator, "data_kind": t.data, "model": model,
                    "data": str(Path(data).expanduser().resolve()), "options": self.form.values(),
                    "folder": str(folder)}
        self.adapter = ""
        self._reset_plot()
        self.sample_text.clear()
        self.sample_image.clear()
        self.sample_image.setText("The samples of each evaluation appear here.")
        self._launch(resume=False)

    @guard
    def resume(self) -> None:
        """Continue the last run from its checkpoint: the plot goes back to the checkpoint's history."""
        if self.busy() or not self.run:
            return
        ck = checkpoint_state(self.run["folder"])
        self._reset_plot()
        for h in ck.get("history", []):
            self._add_point(h)
        self.banner.hide()
        self._launch(resume=True)

    def _launch(self, resume: bool) -> None:
        r = self.run
        self.run_label.setText(f"Run folder: {r['folder']}")
        self.stats.setText("Resuming…" if resume else "Starting the fine-tuning process…")
        self.progress.setRange(0, 0)
        self.progress.setFormat("starting")
        self.process.start(command_args(r["kind"], r["model"], r["data"], r["folder"], r["options"], resume))
        self._buttons()

    @guard
    def pause(self) -> None:
        if self.busy():
            self.stats.setText("Pausing after this step…")
            self.process.pause()

    @guard
    def cancel(self) -> None:
        if self.busy():
            self.stats.setText("Cancelling…")
            self.process.cancel()

    def stop(self) -> None:
        """Closing the studio: pause the run (it resumes from there next time)."""
        self.process.stop()

    # ----- what the process reports ------------------------------------------------------------
    def _reset_plot(self) -> None:
        self.points = {"train": ([], []), "val": ([], []), "mean": []}
        for curve in (self.train_curve, self.mean_curve, self.val_curve):
            curve.setData([], [])

    def _add_point(self, e: dict) -> None:
        self.points["train"][0].append(e["step"])
        self.points["train"][1].append(e["loss"])
        if "val_loss" in e:
            self.points["val"][0].append(e["step"])
            self.points["val"][1].append(e["val_loss"])
        steps, losses = self.points["train"]
        self.train_curve.setData(steps, losses)
        window = losses[-SMOOTH:]
        self.points["mean"].append(sum(window) / len(window))
        self.mean_curve.setData(steps, self.points["mean"])
        self.val_curve.setData(*self.points["val"])

    @guard
    def on_progress(self, e: dict) -> None:
        if "step" not in e:
            if e.get("message"):  # "fine-tuning MODEL: LoRA rank ... ; run folder F" (the folder shows below)
                text = e["message"].split("; run folder ")[0]
                self.stats.setText(text[:1].upper() + text[1:])
            return
        self._add_point(e)
        step, total = e["step"], e["total"]
        self.progress.setRange(0, total)
        self.progress.setValue(step)
        self.progress.setFormat("step %v/%m")
        val = f" · validation {e['val_loss']:.4f}" if "val_loss" in e else \
            (f" · validation {self.points['val'][1][-1]:.4f}" if self.points["val"][1] else "")
        self.stats.setText(f"Step {step}/{total} · {e['seconds_per_step']:.3f} s/step · {fmt_seconds(e['eta_s'])} "
                           f"left · loss {e['loss']:.4f}{val}")
        if "sample" in e:  # text: a text model's writing, or a captioner's captions of fixed images
            self.samples.setCurrentWidget(self.sample_text)
            self.sample_text.appendPlainText(f"— step {step} —\n{e['sample'].strip()}\n")
            self.sample_title.setText(f"Samples (step {step}; fixed prompts and seeds)")
        if "sample_image" in e:
            pix = QPixmap(e["sample_image"])
            if not pix.isNull():
                self.samples.setCurrentWidget(self.sample_image)
                self.sample_image.setPixmap(pix.scaled(pix.width() * SAMPLE_SCALE, pix.height() * SAMPLE_SCALE,
                                                       Qt.AspectRatioMode.KeepAspectRatio,
                                                       Qt.TransformationMode.FastTransformation))
                self.sample_title.setText(f"Samples (step {step}; fixed prompts and seeds)")

    @guard
    def on_succeeded(self, result: dict) -> None:
        self.adapter = result["adapter"]
        val = result.get("final_val_loss")
        self.stats.setText(f"Done: final loss {result.get('final_loss', 0):.4f}"
                           + (f", validation {val:.4f}" if val is not None else "") + ".")
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.progress.setFormat("done")
        self.run_label.setText(f"Adapter: {self.adapter}")
        self._buttons()

    @guard
    def on_failed(self, message: str, how: str) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        ck = checkpoint_state(self.run["folder"]).get("step") if self.run else None
        where = f"its checkpoint at step {ck}" if ck is not None else "the start (no checkpoint was written yet)"
        if how == "paused":
            self.progress.setFormat("paused")
            self.stats.setText(f"Paused; Resume continues from {where}.")
        elif how == "cancelled":
            self.progress.setFormat("cancelled")
            self.stats.setText(f"Cancelled; Resume continues from {where}.")
        else:
            self.progress.setFormat("failed")
            self.stats.setText("Failed.")
            self.banner.show_message(message, self.process.details())
        self._buttons()

    @guard
    def on_use_adapter(self) -> None:
        if not self.adapter or not self.run:
            raise UsageError("Fine-tune to the end first; then its adapter can be used.")
        self.use_adapter.emit(self.run["generator"], self.run["model"], self.adapter)

    def closeEvent(self, event) -> None:  # the page is a window: closing hides it, a run goes on
        event.accept()
