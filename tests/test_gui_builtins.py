"""The built-in generators in the window, on tiny random models: text streams, image previews, caption, export."""
import time

import pytest

from gui_helpers import as_user_models, wait_idle


@pytest.fixture(scope="module")
def model_source(tmp_path_factory):
    import onnx_fixtures as fx

    root = tmp_path_factory.mktemp("gui-models")
    fx.text_folder(root / "tiny-llama", "llama")
    fx.image_folder(root / "tiny-image")
    fx.caption_folder(root / "tiny-caption")
    return root


@pytest.fixture
def models(studio_home, model_source):
    """The tiny random models, as user models of this test's state folder."""
    return as_user_models(model_source, studio_home)


def _window(qtbot):
    from studio.gui.main_window import MainWindow

    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    return w


def test_builtin_generators_run_in_the_window(qtbot, models):
    import torch

    torch.set_num_threads(1)
    w = _window(qtbot)
    missing = {"text", "image", "caption"} - set(w.generator_ids())
    if missing:
        pytest.skip(f"built-in plugin(s) not available yet: {sorted(missing)}")

    def use(model):  # built-in models may be installed too; the test runs the tiny ones
        idx = w.panel.model.findData(model)
        assert idx >= 0, model
        w.panel.model.setCurrentIndex(idx)

    w.select_generator("text")
    use("tiny-llama")
    w.panel.prompt.setPlainText("w1 w2 w3")
    w.panel.form.set_values({"max_new_tokens": 12})
    w.panel.seed.setText("3")
    w.generate()
    wait_idle(qtbot, w, 60000)
    assert not w.banner.isVisible(), w.banner.label.text()
    assert w.output.recipe["model"]["name"] == "tiny-llama" and w.output.text.toPlainText()

    w.select_generator("image")
    use("tiny-image")
    w.panel.prompt.setPlainText("a small red circle in the center on a blue background")
    w.panel.form.set_values({"steps": 4})
    previews = []
    orig = w.output.show_preview
    w.output.show_preview = lambda img, cap="": (previews.append(cap), orig(img, cap))
    w.generate()
    wait_idle(qtbot, w, 60000)
    assert not w.banner.isVisible(), w.banner.label.text()
    assert w.output.image_file() and not w.output.canvas.image.isNull()

    assert w.output.caption_button.isEnabled()
    image = w.output.image_file()
    w.select_generator("caption")
    use("tiny-caption")
    w.panel.image_input.set_path(image)
    w.generate()
    wait_idle(qtbot, w, 60000)
    assert not w.banner.isVisible(), w.banner.label.text()
    assert w.output.recipe["generator"] == "caption" and w.output.caption_text.text() == w.output.recipe["text"]
    assert len(w.session.history.list()) == 3


@pytest.mark.parametrize("isolate", [True, False], ids=["in-the-generation-process", "in-process"])
def test_real_onnx_export_in_the_dialog(qtbot, models, isolate):
    from studio.gui.export_dialog import ExportDialog

    from engine.plugins import DEFAULT_PLUGINS
    from studio.gui.session import Session

    builtins = list(DEFAULT_PLUGINS)
    session = Session(host_kwargs={"builtins": builtins}, isolate=isolate)
    if "text" not in session.host.generators or "llama" not in session.host.exporters:
        pytest.skip("the built-in text plugin or the ONNX exporters are not available yet")
    dlg = ExportDialog(session, None, model="tiny-llama")
    qtbot.addWidget(dlg)
    started = time.monotonic()
    dlg.export_button.click()
    qtbot.waitUntil(lambda: dlg.task is None, timeout=120000)
    assert "parity gate passed" in dlg.result.text(), (dlg.result.text(), dlg.banner.label.text())
    assert "max_abs_diff" in dlg.parity.text()
    assert any(e.onnx for e in session.store.list() if e.name == "tiny-llama")
    assert "exporting the llama decoder" in dlg.log.toPlainText()  # the log lines came through
    assert time.monotonic() - started < 120
    session.close()
