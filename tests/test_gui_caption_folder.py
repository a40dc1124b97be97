"""The window's folder page: a grid fills with thumbnails and captions (in the generation process and in-process),
captions are editable (the edit rewrites the caption file), existing captions are kept, cancel keeps what is done."""

import pytest

import caption_refs as R
from gui_helpers import as_user_models


@pytest.fixture(scope="module")
def blip_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("gui-blip")
    R.save_blip(root / "tiny-blip")
    return root


@pytest.fixture
def models(studio_home, blip_source):
    return as_user_models(blip_source, studio_home)


@pytest.mark.parametrize("isolate", [True, False], ids=["in-the-generation-process", "in-process"])
def test_folder_page_fills_the_grid(qtbot, models, tmp_path, isolate):
    from studio.gui.caption_folder_dialog import CaptionFolderDialog
    from studio.gui.session import Session

    d = tmp_path / "set"
    d.mkdir()
    for i, im in enumerate(R.random_images(5, seed=2)):
        im.save(d / f"im{i}.png")
    (d / "im0.txt").write_text("mine\n")
    (d / "bad.png").write_bytes(b"not an image")
    session = Session(isolate=isolate)
    dlg = CaptionFolderDialog(session, None, folder=str(d))
    qtbot.addWidget(dlg)
    assert dlg.backend.currentText() == session.settings.backend == "auto"  # the settings' default, as elsewhere
    dlg.model.setCurrentIndex(dlg.model.findData("tiny-blip"))
    dlg.prefix.setText("a picture of")
    dlg.start_button.click()
    qtbot.waitUntil(lambda: dlg.task is None, timeout=120000)
    assert dlg.summary == {**dlg.summary, "written": 4, "skipped": 1, "kept": 1, "cancelled": False}, \
        (dlg.summary, dlg.banner.label.text())
    texts = [dlg.grid.item(i).text() for i in range(dlg.grid.count())]
    assert len(texts) == 5 and sum(t.startswith("a picture of") for t in texts) == 4
    assert (d / "im0.txt").read_text() == "mine\n" and (d / "im1.txt").read_text().startswith("a picture of")
    item = [dlg.grid.item(i) for i in range(dlg.grid.count()) if dlg.grid.item(i).data(256)][0]  # UserRole: path
    item.setText("edited by hand")
    assert "edited by hand\n" in [p.read_text() for p in d.glob("*.txt")]
    session.close()


def test_folder_page_cancel_keeps_what_is_done(qtbot, models, tmp_path):
    from studio.gui.caption_folder_dialog import CaptionFolderDialog
    from studio.gui.session import Session

    d = tmp_path / "big"
    d.mkdir()
    for i, im in enumerate(R.random_images(40, seed=5)):
        im.save(d / f"im{i:02d}.png")
    session = Session(isolate=False)
    dlg = CaptionFolderDialog(session, None, folder=str(d))
    qtbot.addWidget(dlg)
    dlg.start_button.click()
    qtbot.waitUntil(lambda: dlg.grid.count() >= 1, timeout=120000)
    dlg.cancel_button.click()
    qtbot.waitUntil(lambda: dlg.task is None, timeout=120000)
    written = list(d.glob("*.txt"))
    assert dlg.summary["cancelled"] and 1 <= len(written) < 40 and len(written) == dlg.summary["written"]
    assert all(p.read_text().strip() for p in written)
    session.close()
