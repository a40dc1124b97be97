"""The boundary around a generator's own code (engine.runner runs it through this): what it prints goes to
stderr, and whatever it raises, or an ``os._exit`` it calls, becomes one GenerationError naming its plugin."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from engine.errors import GenerationError, StudioError

log = logging.getLogger(__name__)


def quietly(events):
    """The generator's events, each made with what it prints sent to stderr (engine.plugins.plugin_output); the
    caller's own handling of an event (a streamed token on stdout) is not."""
    from engine.plugins import plugin_output

    it = iter(events)
    while True:
        with plugin_output():
            try:
                event = next(it)
            except StopIteration:
                return
        yield event


class EndedProcess(BaseException):
    """What ``os._exit`` raises in this process while plugin code runs (see ``plugin_code``)."""

    def __init__(self, code):
        super().__init__(f"it ended its process (os._exit({code})) without a result")


_exit_guard = {"depth": 0, "pid": None, "real": None}
_exit_lock = threading.Lock()


def _raise_instead(code=0):
    if os.getpid() != _exit_guard["pid"]:  # a process the plugin forked ends as it asks
        _exit_guard["real"](code)
    raise EndedProcess(code)


@contextlib.contextmanager
def _exit_raises():
    """While a generator's code runs, ``os._exit`` in this process raises EndedProcess instead: a plugin that ends
    the process fails its job with a sentence, and `studio generate`, `batch`, `queue run` and `serve` go on (they
    died silently, and a queued job that did it killed every worker that took it). A plugin that took
    ``posix._exit`` or ``from os import _exit`` before is not caught: only a process boundary catches that
    (the window runs generations in one, engine/child.py)."""
    with _exit_lock:
        if _exit_guard["depth"] == 0:
            _exit_guard.update(pid=os.getpid(), real=os._exit)
            os._exit = _raise_instead
        _exit_guard["depth"] += 1
    try:
        yield
    finally:
        with _exit_lock:
            _exit_guard["depth"] -= 1
            if _exit_guard["depth"] == 0:
                os._exit = _exit_guard["real"]


@contextlib.contextmanager
def plugin_code(prep, failed: str):
    """Anything but a StudioError that the generator's code raises becomes a GenerationError naming its plugin (an
    ``os._exit`` too: ``_exit_raises``)."""
    try:
        with _exit_raises():
            yield
    except StudioError:
        raise
    except KeyboardInterrupt:
        raise
    except EndedProcess as exc:
        raise GenerationError(f"Generator {prep.generator.info.id} (plugin {prep.plugin}) {failed}: {exc}; "
                              "nothing was saved.") from None
    except BaseException as exc:  # noqa: BLE001 - plugin code (sys.exit or GeneratorExit in it is no success)
        log.debug("generator raised", exc_info=True)
        try:
            said = str(exc)
        except Exception:  # noqa: BLE001 - an exception whose message itself raises
            said = "(its message could not be read)"
        raise GenerationError(f"Generator {prep.generator.info.id} (plugin {prep.plugin}) {failed}: "
                              f"{type(exc).__name__}: {said}") from exc
