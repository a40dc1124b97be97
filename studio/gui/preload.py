"""Load a heavy package's shared libraries without holding the GIL, before the package is imported.

Importing torch in a worker thread stalls the GUI thread: the dynamic loader maps and initialises
``libtorch_cpu.so`` (hundreds of MB) inside ``import``, which holds the GIL for 0.5-0.9 s on a busy machine.
Calling ``dlopen`` through ctypes releases the GIL for the duration of the call, so mapping the libraries first,
from the worker, leaves only the Python part of the import (which yields the GIL every few ms). The later
``import`` finds the libraries already loaded. Linux only; anywhere else, or on any failure, it does nothing.
Measured on the 2-core test machine: the longest GUI stall during ``import torch`` in a worker fell from
570-870 ms to 100-180 ms (what is left is mostly ``torch._C``'s module initialisation, which needs the GIL).

``warm_up`` does that import in a background thread right after the window first shows, so the remaining
stall (50-80 ms on an idle machine) lands while the user is still looking at the new window, not in the
middle of their first generation (benchmarks/gui.py measures both).
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

RTLD_NOW = 0x2  # with RTLD_LOCAL (0): the flags Python itself uses for extension modules
LIBRARIES = {
    "torch": ("lib/libgomp.so.1", "lib/libc10.so", "lib/libtorch_cpu.so", "lib/libtorch.so",
              "lib/libtorch_python.so", "_C.*.so"),
}  # onnxruntime was measured too: its import stalls the GUI for ~55 ms with or without preloading
_done: set = set()


def preload(package: str) -> list:
    """dlopen ``package``'s big libraries with the GIL released; returns the paths loaded (empty when skipped)."""
    if package in _done or package in sys.modules or not sys.platform.startswith("linux"):
        return []
    _done.add(package)
    try:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            return []
        root = Path(spec.origin).parent
        libc = ctypes.CDLL(None)
        dlopen = libc.dlopen
        dlopen.restype = ctypes.c_void_p
        dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
        loaded = []
        for pattern in LIBRARIES.get(package, ()):
            for path in sorted(root.glob(pattern)):
                if dlopen(str(path).encode(), RTLD_NOW):  # a foreign call: ctypes releases the GIL
                    loaded.append(str(path))
        return loaded
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("preloading %s failed: %s", package, exc)
        return []


_warm: dict = {}


def warm_up(backend: str = "torch") -> threading.Thread | None:
    """Import the backend's library (torch, or onnxruntime for "onnx") in a daemon thread; returns the thread,
    or None when it is already imported or ``STUDIO_GUI_WARMUP=0``. The thread has no Qt objects, so quitting
    while it runs needs no clean-up (``app.run_gui`` exits at once then)."""
    package = "onnxruntime" if backend == "onnx" else "torch"
    if package in sys.modules or package in _warm or os.environ.get("STUDIO_GUI_WARMUP", "1") == "0":
        return None

    def run() -> None:
        try:
            preload(package)
            importlib.import_module(package)
        except Exception as exc:  # noqa: BLE001 - the first generation will report a real problem
            log.debug("warming up %s failed: %s", package, exc)

    thread = _warm[package] = threading.Thread(target=run, name=f"warm-up-{package}", daemon=True)
    thread.start()
    return thread


def warming_up() -> bool:
    return any(t.is_alive() for t in _warm.values())


def join_warm_up(package: str = "torch") -> None:
    """Wait for a warm-up import of ``package`` that is under way (two threads importing torch at once have
    failed in the wild; Python's import lock alone is not enough for it)."""
    thread = _warm.get(package)
    if thread is not None and thread is not threading.current_thread():
        thread.join()
