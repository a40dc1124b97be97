"""Caption a folder: pick a folder and a captioner, watch a grid fill with thumbnails and their captions (each
editable: an edit rewrites the caption file), cancel at any point with everything done so far kept.

The work runs in the generation process (engine/child.py ``caption_folder``, the engine's engine.caption_folder
as `studio caption-folder` uses it); this dialog only draws what it reports.
"""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLineEdit, QListWidget, QListWidgetItem

from engine.errors import UsageError
from engine.generators import BACKENDS, CancelToken
from studio.gui.error_banner import ErrorBanner
from studio.gui.image_input import thumbnail
from studio.gui.util import button, choose_folder_into, column, guard, idle_progress, plain_label, row
from studio.gui.task_dialog import TaskDialog

THUMB = 96
PATH_ROLE = Qt.ItemDataRole.UserRole


class CaptionFolderDialog(TaskDialog):
    WAIT_MS = 10000

    def __init__(self, session, parent=None, folder: str = ""):
        super().__init__(parent)
        self.session = session
        self.token = None
        self.started = 0.0
        self.summary = None
        self.setWindowTitle("Caption a folder")
        self.banner = ErrorBanner()
        self.folder = QLineEdit(folder)
        self.folder.setPlaceholderText("A folder of training images")
        browse = button("Choose…", self.choose_folder)
        self.model = QComboBox()
        try:
            for e in session.store.list():
                if e.generator == "caption":
                    self.model.addItem(f"{e.name} ({e.family})", e.name)
        except Exception as exc:  # noqa: BLE001
            self.banner.show_message(f"Listing models failed: {exc}")
        self.backend = QComboBox()
        self.backend.addItems(BACKENDS)
        self.backend.setCurrentText(getattr(session.settings, "backend", "auto"))
        self.prefix = QLineEdit()
        self.prefix.setPlaceholderText("optional, e.g. a picture of (BLIP)")
        self.overwrite = QCheckBox("Replace existing caption files (hand-written ones too)")
        self.recursive = QCheckBox("Include subfolders")
        self.progress = idle_progress()
        self.status = plain_label()
        self.status.setWordWrap(True)
        self.grid = QListWidget()
        self.grid.setViewMode(QListWidget.ViewMode.IconMode)
        self.grid.setIconSize(QSize(THUMB, THUMB))
        self.grid.setGridSize(QSize(THUMB + 80, THUMB + 60))
        self.grid.setWordWrap(True)
        self.grid.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.grid.setEditTriggers(QListWidget.EditTrigger.DoubleClicked | QListWidget.EditTrigger.EditKeyPressed)
        self.grid.itemChanged.connect(self.on_edited)
        self.start_button = button("Caption", self.start)
        self.cancel_button = button("Cancel", self.cancel)
        self.cancel_button.setEnabled(False)
        self.close_button = button("Close", self.accept)
        form = QFormLayout()
        form.addRow("Folder", row((self.folder, 1), browse))
        form.addRow("Captioner", self.model)
        form.addRow("Backend", self.backend)
        form.addRow("Prefix", self.prefix)
        form.addRow("", self.overwrite)
        form.addRow("", self.recursive)
        column(self, self.banner, form, self.progress, self.status, (self.grid, 1),
               row(None, self.start_button, self.cancel_button, self.close_button))
        if self.model.count() == 0:
            self.start_button.setEnabled(False)
            self.status.setText("There is no caption model yet; import one (BLIP or a vision encoder-decoder).")
        self.resize(760, 600)

    @guard
    def choose_folder(self) -> None:
        choose_folder_into(self, "Folder of images", self.folder)

    def request(self) -> dict:
        from dataclasses import asdict

        from engine.runner import Job

        folder = self.folder.text().strip()
        if not folder:
            raise UsageError("Choose a folder of images first.")
        options = {"prefix": self.prefix.text().strip()} if self.prefix.text().strip() else {}
        job = Job("caption", model=self.model.currentData(), backend=self.backend.currentText(),
                  device=getattr(self.session.settings, "device", "auto"), options=options)
        return {"folder": folder, "job": asdict(job), "ext": ".txt", "overwrite": self.overwrite.isChecked(),
                "recursive": self.recursive.isChecked(), "batch_size": 8}

    @guard
    def start(self) -> None:
        if self.task is not None:
            raise UsageError("A folder is already being captioned.")
        request = self.request()
        from engine.caption_folder import plan_folder

        plan = plan_folder(request["folder"], request["ext"], request["overwrite"], request["recursive"])
        self.banner.hide()
        self.grid.clear()
        self.summary = None
        self.progress.setRange(0, max(1, len(plan.todo)))
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m")
        self.status.setText(f"{len(plan.todo)} image(s) to caption; {len(plan.kept)} existing caption file(s) kept.")
        self.token = token = CancelToken()
        process, host, store = self.session.process, self.session.host, self.session.store
        self.started = time.monotonic()
        from engine.runner import Job

        def run(report):
            if process is not None:
                return process.caption_folder(request, token, report)
            from engine.caption_folder import caption_folder  # no generation process (tests): in this thread
            from engine.generators import Context

            def on_item(item, done, total):
                report({"type": "folder_item", "image": str(item.image), "caption": item.caption,
                        "path": str(item.path or ""), "note": item.note, "done": done, "total": total})

            rep = caption_folder(host, store, Job(**request["job"]), plan, request["batch_size"],
                                 Context(cancel=token), on_item)
            return {"written": len(rep.written), "skipped": len(rep.skipped), "kept": rep.kept,
                    "cancelled": rep.cancelled, "seconds": rep.seconds}

        self.start_task(run, "caption-folder", self.on_done, self.on_failed, self.on_message)

    def set_busy(self, busy: bool) -> None:
        self.start_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def stop_task(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self.token is not None:
            self.token.cancel()
            self.status.setText("Cancelling after the current batch; the captions written so far are kept.")

    def on_message(self, msg) -> None:
        if not isinstance(msg, dict) or msg.get("type") != "folder_item":
            return
        done, total = int(msg.get("done", 0)), int(msg.get("total", 1))
        self.progress.setMaximum(max(1, total))
        self.progress.setValue(done)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        self.progress.setFormat(f"%v / %m   {rate:.1f} images/s   {left:.0f} s left")
        self.add_item(msg)

    def add_item(self, msg: dict) -> None:
        image = msg.get("image", "")
        note = msg.get("note") or ""
        text = msg.get("caption") or f"skipped: {note}"
        item = QListWidgetItem(thumbnail(image, THUMB), "")
        item.setToolTip(f"{image}\n{text}")
        self.grid.blockSignals(True)
        item.setText(text)
        if msg.get("path") and not note:
            item.setData(PATH_ROLE, msg["path"])
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        else:
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
        self.grid.addItem(item)
        self.grid.blockSignals(False)

    @guard
    def on_edited(self, item) -> None:
        """An edited caption goes straight to its caption file (atomically)."""
        path = item.data(PATH_ROLE)
        if path:
            from engine.outputs import atomic_write_bytes

            atomic_write_bytes(Path(path), (item.text().strip() + "\n").encode("utf-8"))
            self.status.setText(f"Saved {Path(path).name}.")

    @guard
    def on_done(self, summary) -> None:
        self.summary = summary or {}
        s = self.summary
        how = "Cancelled" if s.get("cancelled") else "Done"
        self.progress.setFormat("cancelled" if s.get("cancelled") else "done")
        self.status.setText(f"{how}: {s.get('written', 0)} caption(s) written, {s.get('skipped', 0)} image(s) "
                            f"skipped, {s.get('kept', 0)} existing kept. Double-click a caption to edit it.")

    @guard
    def on_failed(self, failure) -> None:
        self.progress.setFormat("cancelled" if failure.cancelled else "failed")
        self.banner.show_message(failure.message, failure.details, "error")

