"""Work off the GUI thread: a QThread that runs a plain function and reports through signals.

``Task`` runs ``fn(report)`` in its thread; ``report(obj)`` emits ``message`` (queued to the GUI thread), or, for
a buffered task, appends to a buffer that the GUI drains with ``take()`` on a timer. The result or the error
comes back through ``succeeded``/``failed``. ``generation_task`` wraps ``engine.runner.prepare`` + ``execute``
with a CancelToken that the GUI sets.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from PySide6.QtCore import QThread, Signal

from engine.errors import CancelledError, StudioError
import studio.gui.qtcompat  # noqa: F401 - the PySide6 6.12.0 guard, before any window works

log = logging.getLogger(__name__)


@dataclass
class Failure:
    message: str
    details: str = ""
    cancelled: bool = False
    error: str = ""  # the engine error's class name (ParityError, UsageError, ...), "" for anything else


@dataclass
class Finished:
    """A finished generation: the engine Record plus its image already converted for Qt."""

    record: Any
    qimage: Any = None


class Task(QThread):
    message = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)
    live: set = set()  # every started task until it finishes: app.run_gui checks it before exiting

    def __init__(self, fn: Callable[[Callable[[Any], None]], Any], parent=None, name: str = "task",
                 buffered: bool = False):
        super().__init__(parent)
        self.fn = fn
        self.buffered = buffered
        self._buffer: deque = deque()
        self.setObjectName(name)
        self.started.connect(lambda: Task.live.add(self))
        self.finished.connect(lambda: Task.live.discard(self))

    @classmethod
    def any_running(cls) -> bool:
        return any(t.isRunning() for t in list(cls.live))

    def take(self) -> list:
        """Messages reported since the last call (buffered tasks): the GUI drains them on a timer, so a fast
        generator cannot flood the event loop with one queued event per token."""
        out = []
        while True:
            try:
                out.append(self._buffer.popleft())
            except IndexError:
                return out

    def _report(self, obj) -> None:
        if self.buffered:
            self._buffer.append(obj)  # deque.append is thread-safe
        else:
            self.message.emit(obj)

    def run(self) -> None:  # worker thread
        from engine.errors import describe_exception

        try:
            result = self.fn(self._report)
        except CancelledError as exc:
            self.failed.emit(Failure(str(exc), "", True, type(exc).__name__))
        except BaseException as exc:  # noqa: BLE001 - reported to the window, never raised into Qt
            message, details = describe_exception(exc)
            details = getattr(exc, "details", None) or details  # a child process's own traceback
            log.debug("task %s failed: %s", self.objectName(), message)
            self.failed.emit(Failure(message, details, False, type(exc).__name__ if isinstance(exc, StudioError)
                                     else ""))
        else:
            self.succeeded.emit(result)


@dataclass
class ProgressMsg:
    step: int
    total: int
    message: str
    at: float


@dataclass
class TextMsg:
    text: str


@dataclass
class PreviewMsg:
    qimage: Any
    step: Optional[int] = None


@dataclass
class StatusMsg:
    text: str


@dataclass
class PreparedMsg:
    """Sent once the job is prepared: the resolved seed, device and model."""

    seed: int
    device: str
    model: str


def _relay(report, last_step: list) -> Callable[[dict], None]:
    """The window's side of engine/messages.py: a job's messages (from the generation process, or made here from
    an in-process generator's events) as the objects the window shows."""
    def relay(msg: dict) -> None:
        kind = msg.get("type")
        if kind == "prepared":
            report(PreparedMsg(msg["seed"], msg["device"], msg["model"]))
        elif kind == "progress":
            last_step[0] = msg["step"]
            report(ProgressMsg(msg["step"], msg["total"], msg.get("message", ""), time.monotonic()))
        elif kind == "text":
            report(TextMsg(msg["text"]))
        elif kind == "preview":
            import base64

            from PySide6.QtGui import QImage

            report(PreviewMsg(QImage.fromData(base64.b64decode(msg["png"]), "PNG"), last_step[0]))
    return relay


def generation_task(session, job, token, parent=None, queue_tag: str = "") -> Task:
    """A Task that prepares and executes ``job`` and relays its messages to the window. With a session process
    (``engine.child``) the job runs there; else here, in this worker thread. ``queue_tag``: the job is the
    queue's (its output name and history row say so)."""
    if session.process is not None:
        return _child_generation_task(session, job, token, parent, queue_tag)
    from engine import messages
    from engine.generators import Context
    from engine.runner import execute, prepare
    from studio.gui.util import pil_to_qimage

    def run(report):
        gen = session.host.generators.get(job.generator)
        if gen is not None and gen[0].info.families and "torch" not in sys.modules:
            from studio.gui.preload import preload

            report(StatusMsg("Loading PyTorch (first generation of this session)…"))
            preload("torch")  # map libtorch without holding the GIL, so the window stays responsive
        prep = prepare(session.host, session.store, job)
        req = prep.request
        relay = _relay(report, [None])
        relay(messages.message("prepared", seed=req.seed, device=req.device,
                               model=req.model.name if req.model else ""))

        def on_event(event):
            for msg in messages.event_messages(event):
                relay(msg)

        context = Context(cancel=token, cache=session.cache)
        token.raise_if_cancelled()
        if queue_tag:
            from engine.jobworker import run_prepared

            record = run_prepared(prep, queue_tag, context, on_event, session.history, session.settings.outputs)
        else:
            record = execute(prep, context, on_event, out_dir=session.settings.outputs, history=session.history)
        qimage = pil_to_qimage(record.result.image) if record.result.image is not None else None
        return Finished(record, qimage)

    return Task(run, parent, name=f"generate-{job.generator}", buffered=True)


def _child_generation_task(session, job, token, parent=None, queue_tag: str = "") -> Task:
    from types import SimpleNamespace

    def run(report):
        if not session.process.alive():
            report(StatusMsg("Starting the generation process…"))
        done = session.process.run(job, token, _relay(report, [None]), queue_tag=queue_tag)
        record = SimpleNamespace(recipe=done["recipe"], files=done["files"], history_id=done.get("history_id"),
                                 result=SimpleNamespace(audio=None))  # the output view reads files itself
        return Finished(record, None)

    return Task(run, parent, name=f"generate-{job.generator}", buffered=True)
