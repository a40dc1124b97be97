"""A fine-tuning run in its own process: ``python -m studio.cli finetune KIND ... --json`` under a QProcess.

The child prints one JSON object per logged step (engine.finetune.run_command), then ``{"adapter", ...}``; an error
comes as ``studio: error: SENTENCE`` on stderr with a non-zero exit. Training never runs in the window's process, so
the window never waits on it and a crash of it (a segfault included) ends only the child.

Pause sends SIGTERM: the child stops after its current step and checkpoints there. Cancel kills it at once; the last
periodic checkpoint stays. Either way the run folder resumes with ``--resume``.
"""
from __future__ import annotations

import json
import logging
import sys

from PySide6.QtCore import QObject, QProcess, Signal

log = logging.getLogger(__name__)

ERROR_PREFIX = "studio: error: "


def command_args(kind: str, model: str, data: str, out: str, options: dict, resume: bool = False) -> list:
    """The arguments of ``python`` for one run: each option becomes its ``--name-with-dashes`` flag."""
    args = ["-m", "studio.cli", "finetune", kind, "--model", model, "--data", data, "--out", out, "--json"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args + (["--resume"] if resume else [])


class FinetuneProcess(QObject):
    progress = Signal(dict)  # a logged step ({"step", "total", "loss", ...}) or {"message": text}
    succeeded = Signal(dict)  # {"adapter", "final_loss", "final_val_loss"}
    failed = Signal(str, str)  # one sentence, and how it ended: "paused" | "cancelled" | "error"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.proc = None
        self._stopping = ""
        self._out = b""
        self._err: list = []
        self._result = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.state() != QProcess.ProcessState.NotRunning

    def start(self, args: list) -> None:
        if self.running():
            raise RuntimeError("a fine-tuning process is already running")
        self._stopping, self._out, self._err, self._result = "", b"", [], None
        proc = QProcess(self)
        proc.setProgram(sys.executable)
        proc.setArguments(args)
        proc.readyReadStandardOutput.connect(self._read_out)
        proc.readyReadStandardError.connect(self._read_err)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._error)
        self.proc = proc
        log.debug("fine-tuning: %s %s", sys.executable, " ".join(args))
        proc.start()

    def pause(self) -> None:
        if self.running():
            self._stopping = "paused"
            self.proc.terminate()  # SIGTERM: engine.finetune.run_command checkpoints and stops after this step

    def cancel(self) -> None:
        if self.running():
            self._stopping = "cancelled"
            self.proc.kill()

    def stop(self, wait_ms: int = 3000) -> None:
        """For closing the window: pause, wait a little, then kill."""
        if self.running():
            self.pause()
            if not self.proc.waitForFinished(wait_ms):
                self.proc.kill()
                self.proc.waitForFinished(1000)

    # ----- the child's output ------------------------------------------------------------------
    def _read_out(self) -> None:
        self._out += bytes(self.proc.readAllStandardOutput())
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            if line.strip():
                log.debug("fine-tuning stdout: %s", line[:200])
            return
        if not isinstance(obj, dict):
            return
        if "adapter" in obj:
            self._result = obj
        else:
            self.progress.emit(obj)

    def _read_err(self) -> None:
        text = bytes(self.proc.readAllStandardError()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.startswith("fine-tuning "):  # the run's first line: layers, parameters, data
                self.progress.emit({"message": line})
            if line.strip():
                self._err = (self._err + [line])[-40:]

    def _finished(self, code: int, status) -> None:
        self._read_out()
        if self._out.strip():
            self._line(self._out)
            self._out = b""
        if code == 0 and status == QProcess.ExitStatus.NormalExit and self._result is not None:
            self.succeeded.emit(self._result)
            return
        said = next((line[len(ERROR_PREFIX):] for line in reversed(self._err) if line.startswith(ERROR_PREFIX)), "")
        if self._stopping:
            self.failed.emit(said, self._stopping)
        elif said:
            self.failed.emit(said, "error")
        else:
            how = "it crashed" if status == QProcess.ExitStatus.CrashExit else f"exit status {code}"
            self.failed.emit(f"The fine-tuning process stopped unexpectedly ({how}); its last checkpoint resumes "
                             "with Resume.", "error")

    def _error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.failed.emit(f"Could not start the fine-tuning process ({self.proc.errorString()}).", "error")

    def details(self) -> str:
        """The child's last lines on stderr (for a Details button)."""
        return "\n".join(self._err)
