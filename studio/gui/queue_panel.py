"""The Queue tab: every job of the studio's queue (engine/jobqueue.py) with its state and progress; drag a waiting
job to reorder, pause and resume the queue, cancel, retry, open an output, clear the finished ones.

A thin view over the engine's JobQueue: it reads the queue on a timer (the CLI and the server share it, so jobs
appear here whoever submitted them) and every button is one JobQueue call.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QTimer, QUrl, Qt, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton,
                               QVBoxLayout, QWidget)

from engine.errors import UsageError
from studio.gui.util import guard

REFRESH_MS = 500
JobIdRole = Qt.ItemDataRole.UserRole + 1


class JobList(QListWidget):
    """A list whose waiting jobs can be dragged into a new order; ``reordered`` gives the new order of their ids."""

    reordered = Signal(list)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)

    def dropEvent(self, event) -> None:
        super().dropEvent(event)
        self.reordered.emit(self.queued_ids())

    def queued_ids(self) -> list:
        return [self.item(i).data(JobIdRole) for i in range(self.count())
                if self.item(i).data(Qt.ItemDataRole.UserRole) == "queued"]


class QueuePanel(QWidget):
    changed = Signal()  # the user changed the queue (the window may start the next job)

    def __init__(self, queue, parent=None):
        super().__init__(parent)
        self.queue = queue
        self.list = JobList()
        self.status = QLabel()
        self.pause_button = QPushButton("Pause queue")
        self.cancel_button = QPushButton("Cancel")
        self.retry_button = QPushButton("Retry")
        self.front_button = QPushButton("Move to front")
        self.open_button = QPushButton("Open output")
        self.clear_button = QPushButton("Clear finished")
        buttons = QHBoxLayout()
        for b in (self.pause_button, self.cancel_button, self.retry_button, self.front_button, self.open_button,
                  self.clear_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addWidget(self.status)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)
        self.pause_button.clicked.connect(self.toggle_pause)
        self.cancel_button.clicked.connect(self.cancel_selected)
        self.retry_button.clicked.connect(self.retry_selected)
        self.front_button.clicked.connect(self.front_selected)
        self.open_button.clicked.connect(self.open_selected)
        self.clear_button.clicked.connect(self.clear_finished)
        self.list.reordered.connect(self.reorder)
        self.list.itemDoubleClicked.connect(lambda item: self.open_selected())
        self._snapshot = None
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.refresh()

    @guard
    def refresh(self) -> None:
        jobs = self.queue.list(limit=300)
        paused = self.queue.paused()
        snapshot = (paused, tuple((j.id, j.state, j.step, j.total, j.cancel) for j in jobs))
        if snapshot == self._snapshot:
            return
        self._snapshot = snapshot
        keep = self.selected_id()
        self.list.clear()
        for j in jobs:
            state = "cancelling" if j.cancel and j.state == "running" else j.state
            progress = f" {100 * j.progress:.0f}%" if j.state == "running" else ""
            note = f" ({j.error})" if j.error else ""
            item = QListWidgetItem(f"#{j.id}  {state}{progress}  {j.label}{note}")
            item.setData(Qt.ItemDataRole.UserRole, j.state)
            item.setData(JobIdRole, j.id)
            flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            if j.state == "queued":
                flags |= Qt.ItemFlag.ItemIsDragEnabled
            item.setFlags(flags)
            self.list.addItem(item)
            if j.id == keep:
                item.setSelected(True)
                self.list.setCurrentItem(item)
        waiting = sum(j.state == "queued" for j in jobs)
        running = sum(j.state == "running" for j in jobs)
        self.status.setText(f"{running} running, {waiting} waiting" + (" — the queue is paused" if paused else ""))
        self.pause_button.setText("Resume queue" if paused else "Pause queue")

    def selected_id(self):
        item = self.list.currentItem()
        return item.data(JobIdRole) if item is not None and item.isSelected() else None

    def _need_selection(self) -> int:
        job_id = self.selected_id()
        if job_id is None:
            raise UsageError("Select a job in the queue first.")
        return job_id

    def _done(self) -> None:
        self._snapshot = None
        self.refresh()
        self.changed.emit()

    @guard
    def reorder(self, ids: list) -> None:
        for index, job_id in enumerate(ids):
            self.queue.move(job_id, index)
        self._done()

    @guard
    def toggle_pause(self) -> None:
        self.queue.set_paused(not self.queue.paused())
        self._done()

    @guard
    def cancel_selected(self) -> None:
        self.queue.cancel(self._need_selection())
        self._done()

    @guard
    def retry_selected(self) -> None:
        self.queue.retry(self._need_selection())
        self._done()

    @guard
    def front_selected(self) -> None:
        self.queue.to_front(self._need_selection())
        self._done()

    @guard
    def clear_finished(self) -> None:
        self.queue.clear()
        self._done()

    @guard
    def open_selected(self) -> None:
        job = self.queue.get(self._need_selection())
        files = (job.result or {}).get("files") or []
        if not files:
            raise UsageError(f"Job {job.id} has no output ({job.state}).")
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(Path(files[0]))))
