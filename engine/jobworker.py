"""Working the queue: a loop that claims the next job, runs it through the runner, and records how it ended.

The work itself is done by an executor, ``executor(qjob, token, report) -> finished message``:
``InProcessExecutor`` runs ``engine.runner.prepare``/``execute`` in this process (the CLI, the server, batch);
``ChildExecutor`` sends the job to a ``engine.child.GenerationProcess`` (the GUI, whose process never imports torch).
Both report the messages of engine/messages.py (``progress``, ``text``, ``preview``), which the worker records
as progress and hands to whoever listens to that job (the server streams them).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from engine import messages, state
from engine.errors import CancelledError, StudioError, describe_exception
from engine.generators import CancelToken, Context
from engine.jobqueue import FINISHED, JobQueue, QueueJob
from engine.jobsave import TaggedHistory, output_path

log = logging.getLogger(__name__)


def run_prepared(prep, tag: str, context: Context, on_event: Optional[Callable], history, out_dir: Path):
    """``engine.runner.execute`` for a queue job: its output at the job's own path, its history row tagged."""
    from engine.runner import execute

    path = output_path(out_dir, tag, prep.generator.info.id, prep.generator.info.makes)
    record = execute(prep, context, on_event, out_path=path, history=TaggedHistory(history, tag))
    record.recipe["queue_job"] = tag
    return record


def finished_message(record) -> dict:
    return messages.message("finished", recipe=record.recipe, files=[str(f) for f in record.files],
                            history_id=record.history_id)


class InProcessExecutor:
    """Runs queue jobs in this process, keeping loaded models between jobs."""

    def __init__(self, host, store, history=None):
        from engine.history import History

        self.host, self.store = host, store
        self.history = history or History()
        self.cache: dict = {}

    def __call__(self, qjob: QueueJob, token: CancelToken, report: Callable[[dict], None]) -> dict:
        from engine.runner import prepare, queued_job

        if qjob.kind != "generate":
            return run_other(qjob, self.host, self.store, report)
        prep = prepare(self.host, self.store, queued_job(qjob.job))
        req = prep.request
        report(messages.message("prepared", seed=req.seed, device=req.device,
                                model=req.model.name if req.model else ""))

        def on_event(event) -> None:
            for m in messages.event_messages(event):
                report(m)

        record = run_prepared(prep, qjob.tag, Context(cancel=token, cache=self.cache), on_event,
                              self.history, state.load_settings().outputs)
        return finished_message(record)


def run_other(qjob: QueueJob, host, store, report: Callable[[dict], None]) -> dict:
    """An export or a fine-tune job, in this process. Neither writes a history row; a fine-tune killed midway
    resumes from its last checkpoint when it runs again."""
    j = qjob.job
    if qjob.kind == "export":
        from engine.onnx_export import export_model

        manifest = export_model(host, store.get(j["model"]), quantize=j.get("quantize"), force=bool(j.get("force")),
                                log=lambda m: report(messages.message("log", text=str(m))))
        manifest = json.loads(json.dumps(manifest, default=str))
        return messages.message("finished", recipe={"manifest": manifest}, files=[str(manifest.get("folder"))],
                                history_id=None)
    code = host.trainer(j["kind"], finetune=True).run([str(a) for a in j.get("args", [])])
    if code:
        from engine.errors import GenerationError

        raise GenerationError(f"The fine-tune stopped with status {code}; see its log.")
    return messages.message("finished", recipe={}, files=[], history_id=None)


class ChildExecutor:
    """Runs queue jobs in a generation process (``engine.child.GenerationProcess``)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, qjob: QueueJob, token: CancelToken, report: Callable[[dict], None]) -> dict:
        from engine.runner import queued_job

        if qjob.kind == "export":  # in the generation process too: torch never enters the window's
            j = qjob.job
            manifest = self.process.export(j["model"], j.get("quantize"), bool(j.get("force")), report)
            return messages.message("finished", recipe={"manifest": manifest}, files=[str(manifest.get("folder"))],
                                    history_id=None)
        if qjob.kind != "generate":
            from engine.errors import UsageError

            raise UsageError(f"A {qjob.kind} job runs from `studio queue run`, not in the window.")
        return self.process.run(queued_job(qjob.job), token, report, queue_tag=qjob.tag)


class QueueWorker:
    """Claims and runs queue jobs one at a time. ``on_message(job_id, msg)`` sees every message of every job it
    runs, then a final ``finished`` / ``failed`` / ``cancelled`` one."""

    def __init__(self, queue: JobQueue, executor: Callable, pin: str = "", batch: str = "", poll: float = 0.2,
                 on_change: Optional[Callable[[], None]] = None,
                 on_message: Optional[Callable[[int, dict], None]] = None):
        self.queue, self.executor, self.pin, self.batch, self.poll = queue, executor, pin, batch, poll
        self.on_change = on_change or (lambda: None)
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self.current: Optional[QueueJob] = None
        self.current_token: Optional[CancelToken] = None
        self.on_message = on_message or (lambda job_id, msg: None)
        self._thread: Optional[threading.Thread] = None

    def _tell(self, job_id: int, msg: dict) -> None:
        try:
            self.on_message(job_id, msg)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop the queue
            log.exception("queue listener failed")

    # ----- the loop -------------------------------------------------------------------------------
    def run_one(self) -> Optional[QueueJob]:
        """Claim and run the next job; returns it (finished), or None when there is nothing to run."""
        qjob = self.queue.claim(pin=self.pin, batch=self.batch)
        if qjob is None:
            return None
        qjob.tag = self.queue.tag(qjob.id)
        token = CancelToken()
        self.current, self.current_token = qjob, token
        self.on_change()
        last = [0.0]

        def report(msg: dict) -> None:
            if msg.get("type") == "progress":
                now = time.monotonic()
                if now - last[0] > 0.2 or msg.get("step") == msg.get("total"):
                    last[0] = now
                    if self.queue.report(qjob.id, msg.get("step", 0), msg.get("total", 0), msg.get("message", "")):
                        token.cancel()
                    self.on_change()
            self._tell(qjob.id, msg)

        done = threading.Event()
        watcher = threading.Thread(target=self._watch_cancel, args=(qjob.id, token, done), daemon=True)
        watcher.start()
        final: dict
        try:
            if qjob.cancel:
                raise CancelledError("Generation was cancelled.")
            finished = self.executor(qjob, token, report)
            result = {"files": finished.get("files", []), "text": finished.get("recipe", {}).get("text"),
                      "content_sha256": finished.get("recipe", {}).get("content_sha256")}
            self.queue.finish(qjob.id, finished.get("history_id"), result)
            final = dict(finished, type="finished")
        except CancelledError:
            self.queue.cancelled(qjob.id)
            final = messages.message("cancelled")
        except (KeyboardInterrupt, SystemExit):  # the worker is stopping (Ctrl+C), not the job failing: it goes
            self.queue.release(qjob.id)  # back to its place, as when the window closes, for the next worker
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded on the job; the queue goes on
            message, details = describe_exception(exc)
            if not isinstance(exc, StudioError):
                log.error("queue job %d failed: %s", qjob.id, details)
            self.queue.fail(qjob.id, message, type(exc).__name__)
            final = messages.message("failed", message=message, error=type(exc).__name__)
        finally:
            done.set()
            watcher.join()  # no thread outlives its job (one left in sqlite could meet the interpreter's exit)
            self.current, self.current_token = None, None
        if qjob.grid is not None:
            self._maybe_sheet(qjob.grid)
        self._tell(qjob.id, final)
        self.on_change()
        return self.queue.get(qjob.id)

    def _watch_cancel(self, job_id: int, token: CancelToken, done: threading.Event) -> None:
        """Another process (the CLI, the server) may ask for a cancel in the database; pass it on."""
        try:
            while not done.wait(0.25) and not token.cancelled:
                try:
                    if self.queue.cancel_requested(job_id):
                        token.cancel()
                except StudioError:
                    pass
        finally:
            self.queue.close_thread()

    def _maybe_sheet(self, grid_id: int) -> None:
        jobs = self.queue.grid_jobs(grid_id)
        if any(j.state not in FINISHED for j in jobs):
            return  # (made again when a retried cell finishes: the sheet shows the grid as it is now)
        try:
            from engine.contact_sheet import write_sheet

            path = write_sheet(self.queue.grid(grid_id)["spec"], jobs,
                               state.load_settings().outputs / f"queue-{self.queue.token}-grid-{grid_id}.png")
            self.queue.set_sheet(grid_id, str(path))
        except Exception:  # noqa: BLE001 - a missing sheet is not worth failing the grid over
            log.exception("could not make the contact sheet of grid %d", grid_id)

    def run(self, until_empty: bool = False, max_jobs: Optional[int] = None) -> int:
        """Work the queue until stopped (or until nothing is left to run). Returns how many jobs ran."""
        n, next_sweep = 0, 0.0
        while not self.stop_event.is_set() and (max_jobs is None or n < max_jobs):
            if self.run_one() is not None:
                n += 1
                continue
            if until_empty or time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_SECONDS
                if self._sweep():
                    continue  # a job another worker died on is queued again: run it
            if until_empty:
                break
            self._wake.wait(self.poll)  # a job submitted by this process wakes it at once (wake())
            self._wake.clear()
        return n

    def _sweep(self) -> list:
        """Jobs of workers that died on this machine while this one ran, queued again (they stayed 'running'
        until the next worker started)."""
        try:
            return recover(self.queue, sweep=True)
        except StudioError as exc:
            log.warning("queue: could not look for jobs of stopped workers (%s)", exc)
            return []

    def wake(self) -> None:
        """Look at the queue now (a job was just submitted) instead of at the next poll."""
        self._wake.set()

    def start(self) -> "QueueWorker":
        self._thread = threading.Thread(target=self.run, name="queue-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self._wake.set()
        if self.current_token is not None:
            self.current_token.cancel()
        if self._thread is not None:
            self._thread.join(timeout)


def recover(queue: JobQueue, sweep: bool = False) -> list:
    """``queue.recover`` with the state folder's history and output folder."""
    from engine.history import History

    return queue.recover(History().path, state.load_settings().outputs, sweep)


SWEEP_SECONDS = 10.0  # how often an idle worker looks for jobs of workers that died
