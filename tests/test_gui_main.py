"""The main window, driven through real widgets (pytest-qt, offscreen)."""
import json
import subprocess
import sys
import time

from PySide6.QtCore import QMimeData, Qt, QUrl
from PySide6.QtWidgets import QMessageBox

from gui_helpers import ROOT, gui_home, install_plugins, make_window, wait_idle  # noqa: F401
from plugin_samples import RAISING_GENERATE


def test_generators_listed_with_icons_and_form(qtbot, gui_home):
    w = make_window(qtbot, generator="preview")
    assert {"echo", "tone", "preview", "slow", "describe"} <= set(w.generator_ids())
    item = w.generator_list.currentItem()
    assert not item.icon().isNull()
    form = w.panel.form
    assert set(form.editors) == {"steps", "guidance", "sampler", "negative_prompt"}
    assert form.editors["steps"].toolTip() == "Steps"
    assert form.values() == {"steps": 4, "guidance": 3.0, "sampler": "ddim", "negative_prompt": ""}
    assert not w.panel.image_input.isVisible() and w.panel.prompt.isVisible()
    w.select_generator("describe")
    assert w.panel.image_input.isVisible() and not w.panel.prompt.isVisible()


def test_reloading_plugins_keeps_what_the_form_holds(qtbot, gui_home):
    w = make_window(qtbot, generator="preview")
    w.panel.form.set_values({"steps": 7})
    w.panel.seed.setText("1234")
    w.panel.prompt.setPlainText("kept")
    w.reload_plugins()
    qtbot.waitUntil(lambda: w.current_generator_id() == "preview" and w.panel.info is not None, timeout=20000)
    assert w.panel.form.values()["steps"] == 7 and w.panel.seed.text() == "1234"
    assert w.panel.prompt.toPlainText() == "kept"


def test_text_streams_token_by_token(qtbot, gui_home):
    w = make_window(qtbot, generator="echo")
    w.panel.prompt.setPlainText("to be or not")
    seen = []
    w.output.text.textChanged.connect(lambda: seen.append(w.output.text.toPlainText()))
    qtbot.keyClick(w.panel.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)  # Ctrl+Return
    assert w.is_busy()
    wait_idle(qtbot, w)
    assert w.output.text.toPlainText() == "to be or not to be or not"
    assert seen and w.output.recipe["generator"] == "echo"
    assert not w.banner.isVisible()


def test_slow_tokens_appear_one_by_one(qtbot, gui_home):
    w = make_window(qtbot, generator="slow")
    w.panel.prompt.setPlainText("dots")
    w.panel.form.set_values({"steps": 15})
    seen = []
    w.output.text.textChanged.connect(lambda: seen.append(len(w.output.text.toPlainText())))
    w.generate()
    qtbot.waitUntil(lambda: 0 < len(w.output.text.toPlainText()) < 15, timeout=3000)
    assert w.is_busy()  # text is visible while the generation is still running
    wait_idle(qtbot, w)
    assert seen[-1] == 15 and len(set(seen)) >= 8  # tokens 20 ms apart arrive as separate updates


def test_progress_moves_and_previews_appear(qtbot, gui_home):
    w = make_window(qtbot, generator="preview")
    w.panel.prompt.setPlainText("a red square")
    w.panel.form.set_values({"steps": 6})
    w.panel.seed.setText("5")
    values, previews = [], []
    w.panel.progress.valueChanged.connect(values.append)
    orig = w.output.show_preview
    w.output.show_preview = lambda img, cap="": (previews.append((img.width(), cap)), orig(img, cap))
    w.generate()
    wait_idle(qtbot, w)
    assert max(values) == 6 and len(set(values)) >= 4
    assert len(previews) >= 3 and previews[-1][1] == "preview, step 6/6"  # one per 16 ms drain at most
    assert w.output.canvas.image.width() == 8
    assert w.output.recipe["seed"] == 5 and w.output.image_file().endswith(".png")
    rect = w.output.canvas.target_rect()
    assert rect.width() % 8 == 0 and rect.width() >= 64  # whole-number nearest-neighbour enlargement


def test_cancel_stops_a_generation(qtbot, gui_home):
    w = make_window(qtbot, generator="slow")
    w.panel.prompt.setPlainText("wait")
    w.generate()
    qtbot.waitUntil(lambda: w.panel.progress.value() >= 2, timeout=3000)
    started = time.monotonic()
    qtbot.keyClick(w, Qt.Key.Key_Escape)
    wait_idle(qtbot, w, 2000)
    assert time.monotonic() - started < 1.0
    assert w.panel.progress.format() == "cancelled"
    assert not w.banner.isVisible() and w.output.recipe == {}
    assert w.session.history.list() == []


def test_raising_generator_shows_error_then_next_generation_works(qtbot, gui_home):
    install_plugins(gui_home, crash=RAISING_GENERATE)
    w = make_window(qtbot, generator="crash")
    w.panel.prompt.setPlainText("boom")
    w.generate()
    wait_idle(qtbot, w)
    assert w.banner.isVisible() and "model exploded" in w.banner.label.text()
    assert "Traceback" in w.banner.details.toPlainText()
    assert not w.banner.details.isVisible()
    w.banner.details_button.click()
    assert w.banner.details.isVisible()
    w.select_generator("echo")
    w.panel.prompt.setPlainText("still alive")
    w.generate()
    wait_idle(qtbot, w)
    assert not w.banner.isVisible()
    assert w.output.text.toPlainText() == "still alive still alive"


def test_usage_errors_show_in_the_window(qtbot, gui_home):
    w = make_window(qtbot, generator="echo")
    w.panel.prompt.setPlainText("")
    w.generate()
    assert w.task is None and "needs a prompt" in w.banner.label.text()
    w.select_generator("describe")
    w.generate()
    assert "needs an input image" in w.banner.label.text()


def test_history_survives_a_restart_and_loads_back(qtbot, gui_home):
    w = make_window(qtbot, generator="echo")
    w.panel.prompt.setPlainText("remember me")
    w.panel.form.set_values({"times": 3})
    w.panel.seed.setText("42")
    w.generate()
    wait_idle(qtbot, w)
    w.close()

    w2 = make_window(qtbot)
    assert w2.current_generator_id() == "echo"  # last-used generator and options persist
    assert w2.panel.form.values()["times"] == 3
    panel = w2.history
    assert panel.model.rowCount() == 1
    assert "remember me" in panel.model.data(panel.model.index(0))
    panel.search.setText("nothing like it")
    panel.refresh()
    assert panel.model.rowCount() == 0
    panel.search.setText("remember")
    panel.refresh()
    panel.select_row(0)
    assert '"seed": 42' in panel.recipe.toPlainText()
    w2.select_generator("tone")
    panel.load_current()
    assert w2.current_generator_id() == "echo"
    assert w2.panel.prompt.toPlainText() == "remember me" and w2.panel.seed.text() == "42"
    panel.open_current()
    assert w2.output.text.toPlainText() == "remember me remember me remember me"
    panel.delete_current()
    assert panel.model.rowCount() == 0 and w2.session.history.list() == []


def test_history_thumbnail_and_caption_handover(qtbot, gui_home):
    w = make_window(qtbot, generator="preview")
    w.panel.prompt.setPlainText("thumb")
    w.generate()
    wait_idle(qtbot, w)
    icon = w.history.model.data(w.history.model.index(0), Qt.ItemDataRole.DecorationRole)
    assert not icon.isNull()
    assert w.output.caption_button.isEnabled()
    w.output.caption_button.click()  # image -> caption generator (describe)
    assert w.current_generator_id() == "describe"
    wait_idle(qtbot, w)
    assert w.output.caption_text.text() == "an image of 8 by 8 pixels"
    assert w.output.prompt_button.isEnabled()
    w.output.prompt_button.click()  # text -> image generator
    assert w.current_generator_id() == "preview"
    assert w.panel.prompt.toPlainText() == "an image of 8 by 8 pixels"


def test_replay_gives_the_same_image(qtbot, gui_home):
    w = make_window(qtbot, generator="preview")
    w.panel.prompt.setPlainText("again")
    w.generate()
    wait_idle(qtbot, w)
    first = dict(w.output.recipe)
    w.panel.seed.clear()
    w.output.replay_button.click()
    wait_idle(qtbot, w)
    assert w.output.recipe["seed"] == first["seed"]
    assert w.output.recipe["content_sha256"] == first["content_sha256"]
    assert len(w.session.history.list()) == 2
    assert w.banner.isVisible() and w.banner.label.text() == "Replayed: identical to the original output."
    # a recipe made elsewhere that came out otherwise: the window says so, and why it may have
    w.replay(dict(first, device="cuda", content_sha256="0" * 64))
    wait_idle(qtbot, w)
    assert w.banner.label.text() == ("Replayed: different from the original output; the recipe was made on cuda "
                                     "and is replayed on cpu; arithmetic differs between devices (float16 on a "
                                     "GPU), so the output may differ.")
    w.generate()  # a plain generation says nothing about replays
    wait_idle(qtbot, w)
    assert not w.banner.isVisible()


def test_the_windows_replay_runs_the_recorded_job(qtbot, gui_home, tmp_path, monkeypatch):
    """The window's Replay went through the form: the recorded thread count, an input's kept copy and a model
    folder used in place were not used (the CLI's replay used them). The job is made off the window's thread (it
    hashes the recipe's input files and LoRAs)."""
    import shutil
    import threading

    from engine import replay

    made_in = []
    real = replay.replay_job
    monkeypatch.setattr(replay, "replay_job", lambda *a, **k: made_in.append(threading.current_thread()) or
                        real(*a, **k))

    from engine.store import BUILTIN_DIR

    from studio.gui.main_window import MainWindow

    w = MainWindow()  # the built-in plugins
    qtbot.addWidget(w)
    w.show()
    folder = tmp_path / "mine"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    recipe = {"generator": "text", "prompt": "ROMEO:", "seed": 3, "backend": "torch", "device": "cpu",
              "options": {"max_new_tokens": 4}, "threads": 2,
              "model": {"name": "mine", "path": str(folder), "hash": "", "family": "llama"}}
    w.replay(recipe)
    w.replay(dict(recipe))  # a second click while the first is prepared queues nothing more
    wait_idle(qtbot, w, timeout=60000)
    assert len(w.queue.list()) == 1
    assert not w.banner.isVisible() or "Replayed" in w.banner.message(), w.banner.message()
    assert w.output.recipe["threads"] == 2 and w.output.recipe["model"]["path"] == str(folder.resolve())
    assert made_in and threading.main_thread() not in made_in


def test_audio_output_shows_a_waveform(qtbot, gui_home):
    w = make_window(qtbot, generator="tone")
    w.panel.prompt.setPlainText("abc")
    w.generate()
    wait_idle(qtbot, w)
    assert w.output.kind == "audio" and w.output.waveform.samples is not None
    assert w.output.waveform.duration() > 0.3
    assert w.output.player is not None or "QtMultimedia" in w.output.audio_note.text()


def _mime(path):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    return mime


def test_drop_image_onto_caption_input(qtbot, gui_home, tmp_path):
    from PIL import Image

    Image.new("RGB", (12, 6), "blue").save(tmp_path / "in.jpg")
    w = make_window(qtbot, generator="describe")
    w.panel.image_input.drop_mime(_mime(tmp_path / "in.jpg"))
    assert w.panel.image_input.path.endswith("in.jpg")
    w.generate()
    wait_idle(qtbot, w)
    assert w.output.caption_text.text() == "an image of 12 by 6 pixels"
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    w.handle_drop(_mime(tmp_path / "bad.png"))
    assert w.banner.isVisible() and "bad.png" in w.banner.label.text()
    assert w.panel.image_input.path.endswith("in.jpg")  # unchanged


def test_drop_png_with_recipe_offers_to_load(qtbot, gui_home, tmp_path, monkeypatch):
    from PIL import Image, PngImagePlugin

    from engine.outputs import png_bytes

    recipe = {"generator": "preview", "prompt": "a blue circle", "seed": 1234,
              "options": {"steps": 9, "guidance": 5.5, "sampler": "euler", "negative_prompt": "red"}}
    (tmp_path / "studio.png").write_bytes(png_bytes(Image.new("RGB", (4, 4)), recipe))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a green star\nNegative prompt: blur\nSteps: 7, Sampler: ddim, CFG scale: 2.5, Seed: 77")
    Image.new("RGB", (4, 4)).save(tmp_path / "a1111.png", pnginfo=info)

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.Yes)
    w = make_window(qtbot, generator="echo")
    w.handle_drop(_mime(tmp_path / "studio.png"))
    assert asked and w.current_generator_id() == "preview"
    assert w.panel.prompt.toPlainText() == "a blue circle" and w.panel.seed.text() == "1234"
    assert w.panel.form.values() == recipe["options"]

    w.select_generator("echo")
    w.handle_drop(_mime(tmp_path / "a1111.png"))
    assert w.current_generator_id() == "preview"  # A1111 metadata goes to the image generator
    assert w.panel.prompt.toPlainText() == "a green star" and w.panel.seed.text() == "77"
    assert w.panel.form.values() == {"steps": 7, "guidance": 2.5, "sampler": "ddim", "negative_prompt": "blur"}

    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    w.select_generator("describe")
    w.handle_drop(_mime(tmp_path / "studio.png"))  # declined: used as the input image instead
    assert w.panel.image_input.path.endswith("studio.png")
    assert not w.banner.isVisible()


def test_closing_mid_generation_cancels_quickly(qtbot, gui_home):
    w = make_window(qtbot, generator="slow")
    w.panel.prompt.setPlainText("x")
    w.panel.form.set_values({"steps": 5000})
    w.generate()
    qtbot.waitUntil(lambda: w.panel.progress.value() >= 1, timeout=3000)
    task = w.task
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 2.0
    assert task.isFinished()
    saved = json.loads((gui_home / "settings.json").read_text())["gui"]
    assert saved["generator"] == "slow" and saved["generators"]["slow"]["options"]["steps"] == 5000


def test_screenshot_and_no_torch_import(qtbot, tmp_path):
    code = ("import sys, studio.gui.app, studio.gui.main_window; "
            "print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
    from studio.gui.app import run_gui

    shot = tmp_path / "shot.png"
    assert run_gui(screenshot=str(shot)) == 0
    from PySide6.QtGui import QImage

    image = QImage(str(shot))
    assert image.width() > 600 and image.height() > 400


def test_garbage_gui_settings_do_not_stop_the_window(qtbot, gui_home):
    (gui_home / "settings.json").write_text(json.dumps({"gui": {
        "generators": {"echo": {"options": {"times": "many"}, "seed": "x1", "model": 3}, "tone": [1, 2]},
        "geometry": "not base64!", "generator": "nope", "backend": 5}}))
    w = make_window(qtbot, generator=None)
    assert w.current_generator_id() in w.generator_ids()
    w.select_generator("echo")
    assert w.panel.form.values()["times"] == 2
    w.panel.prompt.setPlainText("ok")
    w.panel.seed.clear()
    w.generate()
    wait_idle(qtbot, w)
    assert w.output.text.toPlainText() == "ok ok"


def test_load_recipe_of_a_missing_generator_says_so_in_the_window(qtbot, gui_home):
    """History's "Load recipe" on a row whose plugin was removed printed a traceback to stderr and showed nothing."""
    w = make_window(qtbot, generator="echo")
    w.history.load_requested.emit({"generator": "uninstalled", "prompt": "x"})
    assert w.banner.isVisible() and "needs generator 'uninstalled'" in w.banner.label.text()


def test_a_recipe_of_the_wrong_shape_changes_nothing_and_says_why(qtbot, gui_home):
    """A recipe whose options were a list showed "AttributeError: 'list' object has no attribute 'items'", after
    its prompt had already replaced the user's."""
    w = make_window(qtbot, generator="echo")
    w.panel.prompt.setPlainText("my own prompt")
    w.history.load_requested.emit({"generator": "echo", "prompt": "theirs", "options": ["repeat", 2]})
    assert w.banner.isVisible() and "options is list" in w.banner.label.text()
    assert w.panel.prompt.toPlainText() == "my own prompt"


def test_a_damaged_history_database_leaves_the_history_view_whole(qtbot, gui_home):
    w = make_window(qtbot, generator="echo")
    (gui_home / "history.sqlite3").write_bytes(b"SQLite format 3\0" + b"\x13garbage" * 512)
    from PySide6.QtCore import qInstallMessageHandler

    said = []
    old = qInstallMessageHandler(lambda mode, context, message: said.append(message))
    try:
        for _ in range(2):  # it raised inside the model's reset, which the next reset then complained about
            w.history.refresh()
    finally:
        qInstallMessageHandler(old)
    assert not [m for m in said if "ResetModel" in m], said
