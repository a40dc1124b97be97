"""The one message schema of the studio's workers: the generation process (engine/child.py), the GUI's worker
threads (studio/gui/worker.py) and the plugin check process (engine/plugin_check.py).

A message is a dict with a ``type`` and its fields; between processes it travels as one JSON line (``encode`` /
``decode``). The types:

=========  ======================================  ==============================================================
type       fields                                  meaning
=========  ======================================  ==============================================================
ready      pid                                     a process is ready for requests
prepared   seed, device, model, backend            a job was validated; its resolved seed, device, model, backend
progress   step, total, message                    a generator's Progress event
text       text                                    a streamed piece of text (a Partial)
preview    png (base64)                            a preview image (a Partial)
log        text                                    a line of an export's or a check's log
finished   recipe, files, history_id               a job is done and recorded
exported   manifest                                an ONNX export is done
folder_item image, caption, path, note, history_id,   one image of a folder captioned (or skipped: ``note``)
           done, total
captioned  written, skipped, kept, cancelled, seconds a folder captioning run is done
probed     info                                    library versions and the device
failed     message, details, cancelled, error      a request failed; ``error`` is the engine error's class name
ok         index                                   the plugin check loaded its index-th plugin
exit                                               (parent side only) the child's output ended
=========  ======================================  ==============================================================
"""
from __future__ import annotations

import base64
import io
import json
from typing import Optional

from engine import errors


def message(type: str, **fields) -> dict:  # noqa: A002 - named as the field, so message(**msg) works
    return {"type": type, **fields}


def encode(type: str, **fields) -> str:  # noqa: A002
    """One JSON line (with its newline); ``encode(**msg)`` sends a message dict."""
    return json.dumps(message(type, **fields)) + "\n"


def decode(line: str) -> Optional[dict]:
    """The message on ``line``, or None for anything that is not one (a stray line a plugin printed)."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and isinstance(msg.get("type"), str) else None


def event_messages(event) -> list:
    """The messages of one generator event (``engine.generators.Progress`` or ``Partial``)."""
    from engine.generators import Partial, Progress

    if isinstance(event, Progress):
        return [message("progress", step=event.step, total=event.total, message=event.message)]
    out = []
    if isinstance(event, Partial):
        if event.text:
            out.append(message("text", text=event.text))
        if event.image is not None:
            buf = io.BytesIO()
            event.image.save(buf, format="PNG")
            out.append(message("preview", png=base64.b64encode(buf.getvalue()).decode("ascii")))
    return out


def failure(exc: BaseException) -> dict:
    """The ``failed`` message of an exception: its one line for people, the traceback, its engine error class."""
    message_, details = errors.describe_exception(exc)
    cancelled = isinstance(exc, errors.CancelledError)
    return message("failed", message=message_, details="" if cancelled else details, cancelled=cancelled,
                   error=type(exc).__name__ if isinstance(exc, errors.StudioError) else "")


def raise_failure(msg: dict, default: str = "The request failed.") -> None:
    """Raise the engine error a ``failed`` message stands for (GenerationError when it names none), with the
    other side's traceback as ``details``."""
    text = msg.get("message") or default
    if msg.get("cancelled"):
        raise errors.CancelledError(text)
    cls = getattr(errors, str(msg.get("error") or ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.StudioError)):
        cls = errors.GenerationError
    err = cls(text)
    err.details = msg.get("details", "")
    raise err
