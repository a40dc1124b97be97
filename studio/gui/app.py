"""Starting the desktop studio: ``run_gui`` (what ``studio gui`` calls) and ``--screenshot``.

Importing this module does not import torch or onnxruntime.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
WARM_UP_AFTER_MS = 300  # start the generation process this long after the window shows


def check_display() -> None:
    """On Linux without a display, Qt aborts the process (SIGABRT) with advice to reinstall; say what to do
    instead, before Qt is asked for one."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        from engine.errors import UsageError

        raise UsageError("No display was found (DISPLAY and WAYLAND_DISPLAY are unset): run the studio on a desktop, "
                         "or set QT_QPA_PLATFORM=offscreen to render the window with `studio gui --screenshot PNG`.")


def application():
    """The QApplication (created once)."""
    from PySide6.QtWidgets import QApplication

    check_display()
    import studio.gui.qtcompat  # noqa: F401 - guards against PySide6 6.12.0's reference leak before any call
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setApplicationName("GenAI Studio")
        app.setOrganizationName("genai-studio")
    return app


def grab_to(widget, path) -> Path:
    """Render ``widget`` to a PNG after letting it show and lay out."""
    from PySide6.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    from engine.errors import StateError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"Cannot save the screenshot: cannot make the folder {path.parent} ({exc.strerror}); "
                         "choose another --screenshot path.") from None
    if not widget.grab().save(str(path)):
        raise StateError(f"Cannot save the screenshot as {path}: the folder is not writable or the name does not "
                         "end in .png; choose another --screenshot path.")
    return path


def _first_paint_class():
    from PySide6.QtCore import QEvent, QObject, QTimer

    class FirstPaint(QObject):
        """Writes the wall-clock time of the window's first paint to a file, then closes the window."""

        def __init__(self, window, path):
            super().__init__(window)
            self.window, self.path, self.done = window, path, False

        def eventFilter(self, obj, event):
            if not self.done and event.type() == QEvent.Type.Paint:
                self.done = True
                self.path.write_text(repr(time.time()))
                QTimer.singleShot(0, self.window.close)
            return False

    return FirstPaint


def _FirstPaint(window, path):
    return _first_paint_class()(window, path)


def _install_excepthook() -> None:
    """An exception that escapes a slot is logged, never fatal."""
    def hook(exc_type, exc, tb):
        log.error("Unhandled error", exc_info=(exc_type, exc, tb))
    sys.excepthook = hook


def _close_on_interrupt(window) -> dict:
    """Ctrl+C (SIGINT) or SIGTERM in the terminal closes every window the normal way (a running generation is
    cancelled, geometry and options are saved); a second one ends the process at once. Python only sees a
    signal when it runs, so a timer wakes it. Returns the previous handlers, for ``run_gui`` to put back."""
    import signal

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(sig, _frame):
        log.info("signal received: closing the window")
        signal.signal(sig, signal.SIG_DFL)  # a second Ctrl+C is not ignored
        modal = QApplication.activeModalWidget()
        if modal is not None:
            modal.close()
        QApplication.closeAllWindows()
    for sig in previous:
        signal.signal(sig, on_signal)
    window._signal_wake = QTimer(window)
    window._signal_wake.timeout.connect(lambda: None)
    window._signal_wake.start(200)
    return previous


def run_gui(screenshot: str | None = None, generator: str | None = None) -> int:
    """Open the window (``generator``: the one shown first). UsageError, before any window, for a generator that is
    not installed, in the words of ``studio generate``."""
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    session = Session()
    if generator is not None:  # (an empty name too: it opened on the last-used generator)
        session.host.generator(generator)
    app = application()
    window = MainWindow(session, generator=generator)
    window.show()
    if screenshot:
        window.persist = False
        grab_to(window, screenshot)
        print(screenshot)
        window.close()
        return 0
    from engine.state import env_flag

    probe = os.environ.get("STUDIO_GUI_FIRST_PAINT")  # used by benchmarks/gui.py
    if probe:
        watcher = _FirstPaint(window, Path(probe))
        window.installEventFilter(watcher)
    elif window.session.process is not None and env_flag("STUDIO_GUI_WARMUP", True):
        from PySide6.QtCore import QTimer

        def warm() -> None:  # start the generation process and load the chosen backend's library there
            backend = window.panel.backend.currentText()
            window.session.process.warm("onnxruntime" if backend == "onnx" else "torch")
        QTimer.singleShot(WARM_UP_AFTER_MS, warm)
    previous = _close_on_interrupt(window)
    _install_excepthook()
    log.info("window shown")
    code = app.exec()
    import signal

    for sig, handler in previous.items():  # a hung shutdown can still be interrupted
        signal.signal(sig, handler)
    from studio.gui.worker import Task

    if Task.any_running():  # a generator ignored the cancel token
        sys.stdout.flush()
        os._exit(code)
    return code
