"""The Queue tab: every job of the studio's queue (engine/jobqueue.py) with its state and progress; drag a waiting
job to reorder, pause and resume the queue, cancel, retry, open an output, clear the finished ones.

A thin view over the engine's JobQueue: it reads the queue on a timer (the CLI and the server share it, so jobs
appear here whoever submitted them) and every button is one JobQueue call.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QTimer, QUrl, Qt, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QAbstractItemView, QListWidget, QListWidgetItem, QWidget

from engine.errors import UsageError
from studio.gui.util import button, column, guard, plain_label, row

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
        self.status = plain_label()
        self.pause_button = button("Pause queue", self.toggle_pause)
        self.cancel_button = button("Cancel", self.cancel_selected)
        self.retry_button = button("Retry", self.retry_selected)
        self.front_button = button("Move to front", self.front_selected)
        self.open_button = button("Open output", self.open_selected)
        self.clear_button = button("Clear finished", self.clear_finished)
        column(self, self.status, (self.list, 1),  # two rows of buttons: one row made the window 1100 px wide at least
               row(self.pause_button, self.cancel_button, self.retry_button, None),
               row(self.front_button, self.open_button, self.clear_button, None))
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

    def toggle_pause(self) -> None:
        self._change(lambda: self.queue.set_paused(not self.queue.paused()))

    def cancel_selected(self) -> None:
        self._change(lambda: self.queue.cancel(self._need_selection()))

    def retry_selected(self) -> None:
        self._change(lambda: self.queue.retry(self._need_selection()))

    def front_selected(self) -> None:
        self._change(lambda: self.queue.to_front(self._need_selection()))

    def clear_finished(self) -> None:
        self._change(self.queue.clear)

    @guard
    def _change(self, action) -> None:
        """Run one change to the queue (errors show in the window), then refresh and tell the window."""
        action()
        self._done()

    @guard
    def open_selected(self) -> None:
        job = self.queue.get(self._need_selection())
        files = (job.result or {}).get("files") or []
        if not files:
            raise UsageError(f"Job {job.id} has no output ({job.state}).")
        if not Path(files[0]).is_file():
            raise UsageError(f"The output of job {job.id} ({files[0]}) is gone (moved or deleted).")
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(Path(files[0]))))
