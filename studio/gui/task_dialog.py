"""A dialog that runs one worker task at a time (studio.gui.worker.Task) off the GUI thread: the model manager,
the plugin manager, the ONNX export and the folder captioner."""
from __future__ import annotations

from PySide6.QtWidgets import QDialog

from studio.gui.worker import Task


class TaskDialog(QDialog):
    """``start_task`` runs ``work(report)`` in a worker thread with its signals wired; the dialog's controls follow
    ``set_busy``; closing the dialog asks the task to stop (``stop_task``) and waits up to ``WAIT_MS`` for it."""
    WAIT_MS = 3000

    def __init__(self, parent=None):
        super().__init__(parent)
        self.task = None

    def start_task(self, work, name: str, succeeded, failed, message=None) -> None:
        self.task = Task(work, self, name=name)
        if message is not None:
            self.task.message.connect(message)
        self.task.succeeded.connect(succeeded)
        self.task.failed.connect(failed)
        self.task.finished.connect(self._task_done)
        self.set_busy(True)
        self.task.start()

    def set_busy(self, busy: bool) -> None:
        """Enable or disable the dialog's controls while a task runs (dialogs override it)."""

    def stop_task(self) -> None:
        """Ask the running task to stop early (dialogs whose work can stop override it)."""

    def _task_done(self) -> None:
        self.set_busy(False)
        if self.task is not None:
            self.task.deleteLater()
        self.task = None

    def done(self, result: int) -> None:
        if self.task is not None:
            self.stop_task()
            self.task.wait(self.WAIT_MS)
        self.before_close()
        super().done(result)

    def before_close(self) -> None:
        """Called when the dialog closes, after its task ended or the wait ran out (dialogs override it)."""
