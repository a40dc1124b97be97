"""Generations in a child process, so that no plugin can take the caller down or hold its interpreter lock.

The GUI runs every generation through a ``GenerationProcess``: a ``python -m engine.child`` process that loads
the plugins and keeps models loaded between jobs. A plugin that crashes the interpreter (a segfault in native
code, ``os._exit``) ends only that process: the job fails with a message and the next job starts a fresh one. A
plugin that holds the GIL for seconds in C code stalls only that process, and torch is imported there, not in
the window's process.

Protocol: the messages of engine/messages.py, one JSON line each. Parent to child: ``{"host": {...}}`` first
(PluginHost keyword arguments), then ``{"job": {...}}`` (an ``engine.runner.Job``; with ``"queue_tag"`` when it
is a queue job), ``{"cancel": true}`` (cancels
the running job), ``{"export": {"model", "quantize", "force"}}`` (an ONNX export), ``{"probe": true}`` or
``{"warm": "torch"}`` (import a library now, while nothing runs). Child to parent: ``ready``; for a job
``prepared``, ``progress``, ``text``, ``preview``, then ``finished`` or ``failed``; for an export ``log`` lines then
``exported`` or ``failed``; ``probed``. The child writes the protocol on a copy of its stdout and points file
descriptor 1 at stderr, so a plugin that prints cannot corrupt it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Callable, Optional

from engine import messages
from engine.errors import CancelledError, GenerationError
from engine.generators import CancelToken

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 5.0  # how long a cancelled generator may take to stop before its process is stopped
CRASHED = ("The generation process stopped unexpectedly ({how}); nothing was saved from this generation. "
           "The next generation starts a fresh process; if it happens again, disable the plugin in Tools > Plugins.")


# ----- the child ---------------------------------------------------------------------------------
def serve() -> int:
    """The child's main loop (``python -m engine.child``)."""
    from engine import state
    from engine.generators import Context
    from engine.history import History
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    # The protocol keeps copies of fd 0 and 1; plugin code sees /dev/null and stderr there.
    inp = os.fdopen(os.dup(0), "r", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull, encoding="utf-8")
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C in the terminal is the window's to handle
    lock = threading.Lock()

    def send(type: str, **fields) -> None:  # noqa: A002 - the schema's field name
        with lock:
            out.write(messages.encode(type, **fields))
            out.flush()

    first = json.loads(inp.readline() or "{}")
    host = PluginHost(**first.get("host", {})).load()
    store, history, cache = ModelStore(host), History(), {}
    jobs: queue.Queue = queue.Queue()
    current = [CancelToken()]

    def read() -> None:  # stdin: requests are queued with their token at once, so a cancel always finds its job
        for line in inp:
            msg = json.loads(line)
            if msg.get("cancel"):
                current[0].cancel()
                continue
            if "job" in msg or "export" in msg or "caption_folder" in msg:
                current[0] = CancelToken()
            jobs.put((msg, current[0]))
        jobs.put((None, None))  # the parent closed the pipe: finish

    threading.Thread(target=read, name="child-stdin", daemon=True).start()
    send(type="ready", pid=os.getpid())
    while True:
        msg, token = jobs.get()
        if msg is None:
            return 0
        if msg.get("warm"):
            try:
                __import__(msg["warm"])
            except Exception:  # noqa: BLE001 - the first job will report a real problem
                pass
            continue
        if msg.get("probe"):
            send(type="probed", info=probe_libraries())
            continue
        if "export" in msg:
            _export(host, store, msg["export"], send)
            continue
        if "caption_folder" in msg:
            _caption_folder(host, store, history, cache, msg["caption_folder"], token, send)
            continue
        try:
            prep = prepare(host, store, Job(**msg["job"]))
            req = prep.request
            send(type="prepared", seed=req.seed, device=req.device, model=req.model.name if req.model else "",
                 backend=req.backend)

            def on_event(event) -> None:
                for m in messages.event_messages(event):
                    send(**m)

            token.raise_if_cancelled()
            context = Context(cancel=token, cache=cache)
            if msg.get("queue_tag"):  # a queue job: its own output name, its history row tagged
                from engine.jobworker import run_prepared

                record = run_prepared(prep, msg["queue_tag"], context, on_event, history,
                                      state.load_settings().outputs)
            else:
                record = execute(prep, context, on_event, out_dir=state.load_settings().outputs, history=history)
            send(type="finished", recipe=record.recipe, files=[str(f) for f in record.files],
                 history_id=record.history_id)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never fatal here
            send(**messages.failure(exc))


def probe_libraries() -> dict:
    """Versions of torch and onnxruntime and the device torch would use (imports both: slow the first time)."""
    out = {}
    try:
        import torch

        out["torch"] = torch.__version__
        out["device"] = (f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available()
                         else f"cpu ({torch.get_num_threads()} threads)")
    except Exception as exc:  # noqa: BLE001 - shown to the user as is
        out["torch"], out["device"] = f"not available ({exc})", "cpu"
    try:
        import onnxruntime

        out["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except Exception as exc:  # noqa: BLE001
        out["onnxruntime"] = f"not available ({exc})"
    return out


def _export(host, store, request: dict, send) -> None:
    """``studio export-onnx`` in the child: log lines as ``log`` messages, then ``exported`` with the manifest."""
    try:
        from engine.onnx_export import export_model

        manifest = export_model(host, store.get(request["model"]), quantize=request.get("quantize"),
                                force=bool(request.get("force")), log=lambda m: send(type="log", text=str(m)))
        send(type="exported", manifest=json.loads(json.dumps(manifest, default=str)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        send(**messages.failure(exc))


def _caption_folder(host, store, history, cache, request: dict, token, send) -> None:
    """``studio caption-folder`` in the child: a ``folder_item`` message per image, then ``captioned``."""
    try:
        from engine.caption_folder import caption_folder, plan_folder
        from engine.generators import Context
        from engine.runner import Job

        plan = plan_folder(request["folder"], request.get("ext", ".txt"), bool(request.get("overwrite")),
                           bool(request.get("recursive")))
        send(type="log", text=f"{len(plan.todo)} image(s) to caption, {len(plan.kept)} caption file(s) kept")

        def on_item(item, done, total) -> None:
            send(type="folder_item", image=str(item.image), caption=item.caption,
                 path=str(item.path) if item.path else "", note=item.note, history_id=item.history_id,
                 done=done, total=total)

        report = caption_folder(host, store, Job(**request["job"]), plan, int(request.get("batch_size", 8)),
                                Context(cancel=token, cache=cache), on_item, history)
        send(type="captioned", written=len(report.written), skipped=len(report.skipped), kept=report.kept,
             cancelled=report.cancelled, seconds=round(report.seconds, 3))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        send(**messages.failure(exc))


# ----- the parent --------------------------------------------------------------------------------
class GenerationProcess:
    """The parent's handle on one child. ``run(job, token, report)`` runs a job and returns the ``finished``
    message; it raises CancelledError, GenerationError (with ``details``), or GenerationError(CRASHED)."""

    def __init__(self, host_kwargs: Optional[dict] = None):
        self.host_kwargs = dict(host_kwargs or {})
        self.proc: Optional[subprocess.Popen] = None
        self.events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # start()
        self._busy = threading.Lock()  # one request at a time
        self._stopped: set = set()  # children ended on purpose (their running request says so)
        self.closed = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if self.closed:
                raise GenerationError("The studio is closing; the generation was not started.")
            if self.alive():
                return
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # this process keeps models loaded between generations, so repacking fp32 ONNX weights once at open
            # pays back in faster prefill and decode (benchmarks/load_time.py --prepack); a CLI run does not
            env.setdefault("STUDIO_ONNX_PREPACK", "1")
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            # its own session: Ctrl+C in the terminal reaches the window, which stops the child; a SIGINT that
            # reached the child while it was still importing would print a traceback before it could ignore it
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.child"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env, bufsize=1,
                                         stderr=subprocess.DEVNULL if sys.stderr is None else None,  # pythonw
                                         start_new_session=os.name == "posix")
            self.events = queue.Queue()
            threading.Thread(target=self._pump, args=(self.proc, self.events), name="child-stdout",
                             daemon=True).start()
            self._send({"host": self.host_kwargs})
            log.info("generation process started (pid %d)", self.proc.pid)

    @staticmethod
    def _pump(proc, events) -> None:
        for line in proc.stdout:
            msg = messages.decode(line)
            if msg is not None:
                events.put(msg)
        events.put(messages.message("exit"))

    def _send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            pass  # a dead child: the pump reports its exit

    def warm(self, package: str) -> None:
        if self.closed:
            return
        self.start()
        self._send({"warm": package})

    def run(self, job, token, report: Callable[[dict], None], queue_tag: str = "") -> dict:
        """Run ``job`` (an engine.runner.Job); returns the ``finished`` message. ``queue_tag``: the job is the
        queue's (engine/jobqueue.py), named and recorded as such."""
        request = {"job": asdict(job), **({"queue_tag": queue_tag} if queue_tag else {})}
        return self._request(request, report, token)

    def export(self, model: str, quantize, force: bool, report: Callable[[dict], None]) -> dict:
        """Export ``model`` to ONNX in the child; returns the manifest (``log`` messages go to ``report``)."""
        return self._request({"export": {"model": model, "quantize": quantize, "force": force}}, report)["manifest"]

    def caption_folder(self, request: dict, token, report: Callable[[dict], None]) -> dict:
        """Caption a folder in the child (engine.caption_folder): ``folder_item`` messages go to ``report``; returns
        the ``captioned`` summary. ``request``: folder, job (a Job as a dict), ext, overwrite, recursive,
        batch_size."""
        return self._request({"caption_folder": request}, report, token)

    def probe(self) -> dict:
        """``probe_libraries()`` as the child sees it (the libraries and device generations use)."""
        return self._request({"probe": True}, lambda m: None)["info"]

    def _request(self, request: dict, report: Callable[[dict], None], token: Optional[CancelToken] = None) -> dict:
        """One request at a time: the replies of two would interleave on the one pipe (an export or the About
        probe started during a generation waits for it)."""
        token = token or CancelToken()
        if not self._busy.acquire(blocking=False):
            report({"type": "log", "text": "waiting for the running generation to finish…"})
            while not self._busy.acquire(timeout=0.1):
                token.raise_if_cancelled()
        try:
            return self._exchange(request, token, report)
        finally:
            self._busy.release()

    def _exchange(self, request: dict, token, report: Callable[[dict], None]) -> dict:
        self.start()
        proc, events = self.proc, self.events
        self._send(request)
        cancel_sent, deadline = False, 0.0
        while True:
            if token.cancelled and not cancel_sent:
                self._send({"cancel": True})
                cancel_sent, deadline = True, time.monotonic() + CANCEL_GRACE_S
            elif cancel_sent and time.monotonic() > deadline:  # a generator that does not look at its cancel
                self._kill(proc)  # token: its process goes, the next generation starts a fresh one
                raise CancelledError(f"Cancelled; the generator did not stop within {CANCEL_GRACE_S:g} s, so its "
                                     "process was stopped (models load again for the next generation).")
            try:
                msg = events.get(timeout=0.05)
            except queue.Empty:
                continue
            kind = msg.get("type")
            if kind in ("finished", "exported", "probed", "captioned"):
                return msg
            if kind == "failed":
                messages.raise_failure(msg, "The generation failed.")
            if kind == "exit":
                code = proc.wait()
                if proc in self._stopped:
                    raise GenerationError("The generation process was stopped (the plugins were reloaded or the "
                                          "window closed); nothing was saved from this generation.")
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise GenerationError(CRASHED.format(how=how))
            if kind != "ready":
                report(msg)

    def _kill(self, proc) -> None:
        self._stopped.add(proc)
        with self._lock:
            if self.proc is proc:
                self.proc = None
        proc.kill()
        proc.wait()

    def stop(self, timeout: float = 1.0, close: bool = False) -> None:
        """End the child (the next request starts a new one, unless ``close``)."""
        self.closed = self.closed or close
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self._stopped.add(proc)
        try:
            proc.stdin.close()  # the child finishes its loop
            proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    raise SystemExit(serve())
