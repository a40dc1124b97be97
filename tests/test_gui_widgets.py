"""Small widgets on their own: the option form, the image canvas, the error banner, the emit work-around."""
import sys

from engine.generators import Option


def test_option_form_builds_editors_from_specs(qtbot):
    from PySide6.QtWidgets import QCheckBox, QComboBox, QLineEdit, QSpinBox

    from studio.gui.option_form import FloatField, OptionForm

    opts = (Option("steps", "int", 20, "How many steps", min=1, max=200),
            Option("guidance", "float", 7.5, "Guidance scale", min=0.0, max=20.0),
            Option("eta", "float", 0.0, "Unbounded float"),
            Option("sampler", "str", "ddim", "Sampler", choices=("ddim", "euler")),
            Option("tiled", "bool", False, "Tile"),
            Option("stop", "str", "", "Stop text"))
    form = OptionForm(opts)
    qtbot.addWidget(form)
    kinds = {name: type(ed) for name, ed in form.editors.items()}
    assert kinds == {"steps": QSpinBox, "guidance": FloatField, "eta": FloatField, "sampler": QComboBox,
                     "tiled": QCheckBox, "stop": QLineEdit}
    assert form.editors["guidance"].slider is not None and form.editors["eta"].slider is None
    assert form.editors["steps"].toolTip() == "How many steps"
    assert form.values() == {o.name: o.default for o in opts}
    form.editors["guidance"].slider.setValue(500)  # half-way
    assert form.values()["guidance"] == 10.0
    skipped = form.set_values({"steps": 500, "sampler": "euler", "tiled": "yes", "unknown": 1, "guidance": "2.5"})
    assert sorted(skipped) == ["steps", "unknown"]  # out of range, not an option
    values = form.values()
    assert (values["sampler"], values["tiled"], values["guidance"], values["steps"]) == ("euler", True, 2.5, 20)
    assert form.editors["guidance"].slider.value() == 125
    form.reset()
    assert form.values() == {o.name: o.default for o in opts}
    # a recipe's value with more decimals than the box shows is kept exactly (it was replayed rounded to 3)
    form.set_values({"guidance": 7.8125, "eta": 1e-7})
    assert form.values()["guidance"] == 7.8125 and form.values()["eta"] == 1e-7
    form.editors["guidance"].spin.setValue(3.25)  # edited by the person: what the box shows
    assert form.values()["guidance"] == 3.25


def test_canvas_scales_by_whole_numbers(qtbot):
    from PySide6.QtGui import QImage

    from studio.gui.image_canvas import ImageCanvas

    canvas = ImageCanvas()
    qtbot.addWidget(canvas)
    canvas.resize(308, 308)
    canvas.set_image(QImage(32, 32, QImage.Format.Format_RGB32))
    rect = canvas.target_rect()
    assert rect.width() == 288 and rect.height() == 288  # 9x, not 9.375x
    canvas.set_image(QImage(1000, 500, QImage.Format.Format_RGB32))
    assert canvas.target_rect().width() == 300  # shrinking keeps the aspect


def test_banner_details_on_demand(qtbot):
    from studio.gui.error_banner import ErrorBanner

    banner = ErrorBanner()
    qtbot.addWidget(banner)
    banner.show()
    banner.show_message("It broke.", "Traceback: ...")
    assert banner.isVisible() and not banner.details.isVisible() and banner.details_button.isVisible()
    banner.details_button.click()
    assert banner.details.isVisible()
    banner.show_message("Just saying.", kind="info")
    assert not banner.details_button.isVisible()
    banner.close_button.click()
    assert not banner.isVisible()


def test_emit_does_not_leak_true(qtbot):
    from PySide6.QtCore import QObject, Signal

    from studio.gui import qtcompat

    class Source(QObject):
        fired = Signal(object)

    src = Source()
    got = []
    src.fired.connect(got.append)
    before = sys.getrefcount(True)
    for i in range(5000):
        src.fired.emit(i)
    assert len(got) == 5000
    assert abs(sys.getrefcount(True) - before) < 50 or qtcompat.GUARDED  # 6.12.0 dropped one per emit


def test_qt_binding_does_not_leak_references_or_is_guarded(qtbot):
    """PySide6 6.12.0 dropped a reference to None on every void call; 5,000 calls aborted the interpreter."""
    import sys

    from PySide6.QtWidgets import QLabel

    from studio.gui import qtcompat

    label = QLabel()
    qtbot.addWidget(label)
    before = sys.getrefcount(None)
    for _ in range(2000):
        label.setText("x")
    assert sys.getrefcount(None) >= before - 10 or qtcompat.GUARDED


def test_save_as_says_what_went_wrong_in_a_sentence(qtbot, tmp_path):
    """Save as after the output was deleted, into a missing folder or onto the output itself was FileNotFoundError
    or SameFileError in the banner; a dropped 30000 x 30000 PNG was Pillow's DecompressionBombError text."""
    import pytest
    from PIL import Image

    from engine.errors import UsageError
    from engine.outputs import read_png_recipe
    from studio.gui.output_view import OutputView

    view = OutputView()
    qtbot.addWidget(view)
    out = tmp_path / "a.txt"
    out.write_text("hi")
    view.files = [str(out)]
    assert view.save_to(str(out)) == out and out.read_text() == "hi"  # onto itself: already there
    with pytest.raises(UsageError, match="Cannot save to .*nope"):
        view.save_to(str(tmp_path / "nope" / "b.txt"))
    out.unlink()
    with pytest.raises(UsageError, match="is gone"):
        view.save_to(str(tmp_path / "c.txt"))
    Image.new("1", (30000, 30000)).save(tmp_path / "bomb.png")
    with pytest.raises(UsageError, match="too large to read safely"):
        read_png_recipe(tmp_path / "bomb.png")


def test_one_long_line_is_shown_broken_and_copied_whole(qtbot):
    """A result that is one line with no spaces (a plugin's, a degenerate model's) froze the window: Qt laid a
    200,000-character line out in seconds and a 1,000,000-character one for over 25 s. The view breaks lines
    after LONG_LINE characters, while streaming too; Copy gives the text itself."""
    import time

    from PySide6.QtWidgets import QApplication

    from studio.gui.output_view import OutputView
    from studio.gui.util import LONG_LINE, breakable

    assert breakable("ab\ncd") == "ab\ncd"
    assert breakable("x" * (2 * LONG_LINE + 1)) == "\n".join(["x" * LONG_LINE] * 2 + ["x"])
    assert breakable("y" * 5, column=LONG_LINE - 2) == "yy\nyyy"
    assert breakable("z", column=LONG_LINE) == "\nz"
    view = OutputView()
    qtbot.addWidget(view)
    view.resize(600, 400)
    view.show()
    text = "x" * 1_000_000
    started = time.perf_counter()
    view.show_result({"text": text, "generator": "text"}, [])
    QApplication.processEvents()
    assert time.perf_counter() - started < 3  # over 25 s before
    shown = view.text.toPlainText()
    assert shown.replace("\n", "") == text and max(len(line) for line in shown.split("\n")) == LONG_LINE
    view.copy()
    assert QApplication.clipboard().text() == text
    view.text.clear()
    for _ in range(5):  # streamed pieces keep the lines short too
        view.append_text("y" * (LONG_LINE // 2 + 7))
    assert max(len(line) for line in view.text.toPlainText().split("\n")) == LONG_LINE


def test_the_window_fits_a_laptop_screen_with_a_larger_font(qtbot, studio_home):
    """At a 14 pt font the window could not be made narrower than 1279 px (the Queue tab's six buttons in one
    row), and the form pane clipped its widgets with no scroll bar."""
    from PySide6.QtWidgets import QApplication

    from studio.gui.main_window import MainWindow

    app = QApplication.instance()
    font = app.font()
    bigger = app.font()
    bigger.setPointSize(14)
    app.setFont(bigger)
    try:
        w = MainWindow()
        w.persist = False
        qtbot.addWidget(w)
        assert w.minimumSizeHint().width() <= 1200
    finally:
        app.setFont(font)


def test_a_paste_longer_than_a_prompt_is_refused_in_a_sentence(qtbot, studio_home):
    """A pasted 1,000,000-character line stalled the prompt box (Qt's layout), for a prompt a job refuses anyway."""
    import time

    from PySide6.QtCore import QMimeData

    from engine.runner import MAX_PROMPT_CHARS
    from studio.gui.main_window import MainWindow

    w = MainWindow()
    w.persist = False
    qtbot.addWidget(w)
    w.show()
    w.select_generator("text")
    w.panel.prompt.setPlainText("keep me")
    big = QMimeData()
    big.setText("x" * 1_000_000)
    t0 = time.perf_counter()
    w.panel.prompt.insertFromMimeData(big)
    assert time.perf_counter() - t0 < 1.0
    assert w.panel.prompt.toPlainText() == "keep me"
    assert w.banner.isVisible() and "1,000,000 characters; a prompt holds at most" in w.banner.message()
    fits = QMimeData()
    fits.setText("y" * (MAX_PROMPT_CHARS - len("keep me")))
    w.panel.prompt.insertFromMimeData(fits)
    assert len(w.panel.prompt.toPlainText()) == MAX_PROMPT_CHARS
