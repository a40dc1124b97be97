"""Work-arounds for bugs in the installed Qt binding.

PySide6 6.12.0 on Python < 3.12 returns ``True`` from ``SignalInstance.emit`` without taking a reference, so every
Python-side ``emit`` drops one reference to ``True``; after a few thousand emits (a streamed text, a progress bar)
the interpreter aborts with "bool_dealloc: deallocating True or False". ``emit`` below measures the leak once
and gives the reference back after each call when (and only when) the binding has the bug.
"""
from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal


class _Probe(QObject):
    fired = Signal(object)


def _measure_leak() -> int:
    if sys.version_info >= (3, 12):  # True is immortal: nothing to give back
        return 0
    probe = _Probe()
    probe.fired.connect(lambda _x: None)
    before = sys.getrefcount(True)
    for _ in range(4):
        probe.fired.emit(None)
    leaked = (before - sys.getrefcount(True)) // 4
    for _ in range(4 * max(leaked, 0)):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(True))
    return max(leaked, 0)


LEAK = _measure_leak()


def emit(signal, *args) -> None:
    """``signal.emit(*args)``, undoing the binding's reference leak on ``True`` if it has one."""
    signal.emit(*args)
    for _ in range(LEAK):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(True))
