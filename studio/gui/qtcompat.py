"""A guard against a reference-counting bug in PySide6 6.12.0 on Python < 3.12.

That release drops a reference to ``None`` on every call of a method that returns nothing (``setText``,
``processEvents``, ...) and one to ``True`` on every ``Signal.emit``. ``None`` starts with about 5,000
references in the window's process, so after a few thousand calls the interpreter aborts ("none_dealloc:
deallocating None"); with torch imported it takes ten times longer, which hid the bug until generations moved to
their own process. PySide6 6.11.3 does not have it, and pyproject.toml excludes 6.12.0.

If the bug is present anyway, ``GUARDED`` is set: ``None``, ``True`` and ``False`` get 2**40 extra references at
import, so they cannot run out in any session, and a warning names the fix. On Python 3.12+ these objects are
immortal and nothing is done.
"""
from __future__ import annotations

import ctypes
import logging
import sys

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)


class _Probe(QObject):
    fired = Signal(object)


def leaks() -> bool:
    """Whether this binding drops references to None (void calls) or True (emit)."""
    if sys.version_info >= (3, 12):
        return False
    probe = _Probe()
    probe.fired.connect(lambda _x: None)
    none, true = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(8):
        probe.setObjectName("probe")  # returns nothing
        probe.fired.emit(0)
    return sys.getrefcount(None) < none - 4 or sys.getrefcount(True) < true - 4


def _guard() -> bool:
    if not leaks():
        return False
    for obj in (None, True, False):  # ob_refcnt is the first field of every object (CPython < 3.12)
        ctypes.c_ssize_t.from_address(id(obj)).value += 1 << 40
    import PySide6

    log.warning("PySide6 %s loses references to None and True on every call (a known bug of 6.12.0); the studio "
                "works around it, but `pip install \"PySide6-Essentials!=6.12.0\"` is the fix.", PySide6.__version__)
    return True


GUARDED = _guard()
