"""Load a heavy package's shared libraries without holding the GIL, before the package is imported.

Importing torch in a worker thread stalls the GUI thread: the dynamic loader maps and initialises
``libtorch_cpu.so`` (hundreds of MB) inside ``import``, which holds the GIL for 0.5-0.9 s on a busy machine.
Calling ``dlopen`` through ctypes releases the GIL for the duration of the call, so mapping the libraries first,
from the worker, leaves only the Python part of the import (which yields the GIL every few ms). The later
``import`` finds the libraries already loaded. Linux only; anywhere else, or on any failure, it does nothing.
Measured on the 2-core test machine: the longest GUI stall during ``import torch`` in a worker fell from
570-870 ms to 100-180 ms (what is left is mostly ``torch._C``'s module initialisation, which needs the GIL).
Only the in-process mode (``STUDIO_GUI_ISOLATE=0``) and the About probe without a generation process need this:
normally torch is imported in the generation process (engine/child.py), never in the window's.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
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
