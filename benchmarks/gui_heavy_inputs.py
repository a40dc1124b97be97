"""How long the window's thread is blocked by large inputs a user can bring:

- a text result that is one line of 1,000,000 characters with no spaces (the output view, and its recipe view);
- painting an inpainting mask over a 6000 x 4000 photo (each drag move paints and repaints; a repaint alone);
- the fine-tune page's preview of a text dataset that is one 176 MB file;
- a chat of 80 turns of 2,000 words each with the built-in model's tokenizer: a keystroke in the message box (the
  meter), Send when the conversation must lose its oldest turns (the turns to leave out are found), and restoring
  the conversation at start.

    QT_QPA_PLATFORM=offscreen python benchmarks/gui_heavy_inputs.py [--timeout 60] [--only chat]

Each row is the wall time of the call on the GUI thread (Qt's layout and painting included, forced with
``grab``). A row that runs past --timeout seconds (in a child process) is reported as such. Compare rows measured
in one run: to time the code of another commit, run this file from that commit's checkout.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _app():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def long_line() -> float:
    from studio.gui.output_view import OutputView

    app = _app()
    view = OutputView()
    view.resize(700, 500)
    view.show()
    app.processEvents()
    started = time.perf_counter()
    view.show_result({"text": "x" * 1_000_000, "generator": "text"}, [])
    view.grab()
    return time.perf_counter() - started


def recipe_view() -> float:
    from studio.gui.recipe_dialog import RecipeDialog

    app = _app()
    started = time.perf_counter()
    dialog = RecipeDialog({"prompt": "x" * 1_000_000, "generator": "text"})
    dialog.show()
    app.processEvents()
    dialog.grab()
    return time.perf_counter() - started


def _canvas():
    from PySide6.QtGui import QColor, QImage

    from studio.gui.mask_canvas import MaskCanvas

    app = _app()
    canvas = MaskCanvas()
    canvas.resize(700, 500)
    canvas.show()
    app.processEvents()
    photo = QImage(6000, 4000, QImage.Format.Format_RGB32)
    photo.fill(QColor(10, 200, 30))
    canvas.set_image(photo)
    canvas.grab()
    return canvas


def mask_drag() -> float:
    """The mean of 10 drag moves, each a brush stroke and a repaint."""
    from PySide6.QtCore import QPointF

    canvas = _canvas()
    r = canvas.target_rect()
    started = time.perf_counter()
    for i in range(10):
        canvas.paint_at(QPointF(r.x() + 50 + 20 * i, r.y() + 100))
        canvas.grab()
    return (time.perf_counter() - started) / 10


def mask_repaint() -> float:
    """The mean of 10 repaints of a painted mask with nothing changed (a window moved over it, a resize)."""
    from PySide6.QtCore import QPointF

    canvas = _canvas()
    canvas.paint_at(QPointF(canvas.target_rect().center()))
    canvas.grab()
    started = time.perf_counter()
    for _ in range(10):
        canvas.grab()
    return (time.perf_counter() - started) / 10


def preview_corpus() -> float:
    from studio.gui.dataset_preview import DatasetPreview

    _app()
    with tempfile.TemporaryDirectory() as tmp:
        line = b"Praise ye the LORD. O give thanks unto the LORD; for he is good.\n"
        with open(Path(tmp) / "corpus.txt", "wb") as f:
            f.write(line * (176_000_000 // len(line)))
        preview = DatasetPreview()
        started = time.perf_counter()
        preview.show_folder(tmp, "text")
        return time.perf_counter() - started


def _chat_view(context: int):
    from engine import chat, state
    from engine.configs import read_json
    from studio.gui.chat_view import ChatView

    _app()
    folder = state.BUILTIN_MODELS / "shakespeare-llama"
    entry = type("Entry", (), {"path": folder, "name": folder.name, "config": read_json(folder / "config.json")})
    view = ChatView()
    view.resize(900, 700)
    view.show()
    view.set_model(entry, 200)
    view.context = context
    words = ("thou art the fairest flower of all the field and yet " * 200).split()[:2000]
    turns = [chat.Message("user" if i % 2 == 0 else "assistant", f"{i} " + " ".join(words)) for i in range(80)]
    return view, turns


def chat_keystroke() -> float:
    """The window's thread per keystroke once the meter's pause has passed (counting runs in its own thread)."""
    view, turns = _chat_view(10 ** 7)
    view.set_conversation(turns)
    _app().processEvents()
    started = time.perf_counter()
    for ch in "hello":
        view.input.insertPlainText(ch)
        view.update_meter()
    return (time.perf_counter() - started) / 5


def chat_send_over() -> float:
    """Send with a context that holds about half the conversation: which oldest turns to leave out."""
    view, turns = _chat_view(10 ** 7)
    view.set_conversation(turns)
    view.input.setPlainText("and now?")
    view.context = view.fit().tokens // 2
    getattr(view.tokenizer, "counts", {}).clear()  # (no count the meter made before)
    view.ask_drop = lambda fit, dropped: True
    started = time.perf_counter()
    view.to_send()
    return time.perf_counter() - started


def chat_send_over_counted() -> float:
    """The same Send once the meter has counted (it works out in its thread which turns Send would leave out)."""
    view, turns = _chat_view(10 ** 7)
    view.set_conversation(turns)
    view.input.setPlainText("and now?")
    view.context = view.fit().tokens // 2
    view.ask_drop = lambda fit, dropped: True
    view.update_meter()
    for future in (getattr(view, "counting", None) or (None, None))[1:] + (getattr(view, "ahead", None),):
        if future is not None:
            future.result()
    started = time.perf_counter()
    view.to_send()
    return time.perf_counter() - started


def chat_restore() -> float:
    view, turns = _chat_view(10 ** 7)
    state = {"system": "", "input": "", "turns": [[m.role, m.content] for m in turns]}
    started = time.perf_counter()
    view.restore(state)
    _app().processEvents()
    view.grab()
    return time.perf_counter() - started


ROWS = [("text result: one line of 1,000,000 characters (output view)", long_line),
        ("recipe view of a 1,000,000-character prompt", recipe_view),
        ("mask over a 6000 x 4000 photo: one drag move (paint + repaint)", mask_drag),
        ("mask over a 6000 x 4000 photo: one repaint, nothing changed", mask_repaint),
        ("fine-tune preview of a 176 MB text file", preview_corpus),
        ("chat, 80 turns x 2,000 words: one keystroke (meter)", chat_keystroke),
        ("chat, 80 turns x 2,000 words: Send that must leave out turns", chat_send_over),
        ("chat, 80 turns x 2,000 words: the same Send after the meter counted", chat_send_over_counted),
        ("chat, 80 turns x 2,000 words: restored at start", chat_restore)]


def _child(fn, queue) -> None:
    queue.put(fn())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--only", default="", help="the rows whose label holds this text (e.g. chat)")
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    print("| input | GUI thread blocked |\n|---|---|")
    for label, fn in [r for r in ROWS if a.only in r[0]]:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(fn, queue))
        proc.start()
        proc.join(a.timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            shown = f"over {a.timeout:.0f} s (stopped)"
        else:
            seconds = queue.get() if not queue.empty() else None
            shown = "failed" if seconds is None else (f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s")
        print(f"| {label} | {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
