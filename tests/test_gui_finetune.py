"""The fine-tune page (Tools > Fine-tune): the loss plot fills as `studio finetune` runs in its own process, Stop
keeps the checkpoint and Resume continues from it, "Use this adapter" selects it in the generator; bad input is a
sentence in the page."""
from pathlib import Path

import pytest

from gui_helpers import make_window

PSALMS = Path(__file__).resolve().parent.parent / "resources" / "data" / "psalms" / "psalms_kjv.txt"


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "psalms"
    folder.mkdir()
    (folder / "psalms.txt").write_text(PSALMS.read_text(encoding="utf-8")[:20000])
    return folder


def _dialog(qtbot, window):
    from studio.gui.finetune_dialog import FinetuneDialog

    dlg = FinetuneDialog(window.session, window)
    qtbot.addWidget(dlg)
    dlg.use_adapter.connect(window.use_finetuned)
    return dlg


def test_finetune_page_plots_stops_resumes_and_uses_the_adapter(qtbot, studio_home, data, tmp_path):
    w = make_window(qtbot, isolate=False)
    w.session.host_kwargs = {}
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    w.session.host = PluginHost().load()  # the built-in plugins bring the text and image fine-tuners
    w.session.store = ModelStore(w.session.host)
    w.populate_generators()
    dlg = _dialog(qtbot, w)
    assert {dlg.kind.itemData(i) for i in range(dlg.kind.count())} >= {"text", "image"}
    dlg.kind.setCurrentIndex(dlg.kind.findData("text"))
    assert dlg.model.findData("shakespeare-llama") >= 0
    dlg.data.setText(str(data))
    assert dlg.preview.count() == 1 and "PSALM 1" in dlg.preview.item(0).toolTip()
    dlg.steps.setValue(400)
    dlg.batch.setValue(2)
    dlg.eval_every.setValue(5)
    dlg.out.setText(str(tmp_path / "run"))
    dlg.start()
    qtbot.waitUntil(lambda: len(dlg.vals) >= 2, timeout=120000)
    assert dlg.train_curve.getData()[0] is not None and len(dlg.train_curve.getData()[0]) == len(dlg.losses)
    assert "s per step" in dlg.timing.text()
    dlg.stop_task()
    qtbot.waitUntil(lambda: dlg.proc is None, timeout=60000)
    assert not dlg.adapter and "Stopped" in dlg.banner.label.text()  # a sentence; the checkpoint is kept
    stopped_at = dlg.losses[-1][0]
    dlg.steps.setValue(stopped_at + 10)
    dlg.start(True)
    qtbot.waitUntil(lambda: dlg.proc is None, timeout=120000)
    assert dlg.adapter and dlg.use_button.isEnabled(), dlg.stderr[-2000:]
    assert dlg.losses[-1][0] == stopped_at + 10
    dlg.use_button.click()
    assert w.panel.info.id == "text" and w.panel.loras.specs() == [f"{dlg.adapter}:1"]


def test_bad_data_is_a_sentence(qtbot, studio_home, tmp_path):
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    w = make_window(qtbot, isolate=False)
    w.session.host = PluginHost().load()
    w.session.store = ModelStore(w.session.host)
    dlg = _dialog(qtbot, w)
    dlg.kind.setCurrentIndex(dlg.kind.findData("image"))
    dlg.data.setText(str(tmp_path / "missing"))
    dlg.start()
    assert dlg.proc is None and "data folder" in dlg.banner.label.text()
    empty = tmp_path / "empty"
    empty.mkdir()
    dlg.data.setText(str(empty))
    dlg.start()
    qtbot.waitUntil(lambda: dlg.proc is None, timeout=60000)
    assert "holds no images" in dlg.banner.label.text() and not w.isHidden()
