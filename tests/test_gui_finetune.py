"""The fine-tune page (Tools > Fine-tune (LoRA)…), driven through its widgets (pytest-qt, offscreen): a real LoRA run of
the built-in models in a child process, on tiny data made here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gui_helpers import ROOT  # noqa: F401  (sets the offscreen platform)

PSALM = ("Praise ye the LORD. O give thanks unto the LORD; for he is good: for his mercy endureth for ever. "
         "Who can utter the mighty acts of the LORD? who can shew forth all his praise?\n") * 6


@pytest.fixture
def window(qtbot, studio_home):
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    w = MainWindow(Session(isolate=False))
    w.persist = False
    qtbot.addWidget(w)
    w.show()
    w.open_finetune()
    qtbot.addWidget(w.finetune_page)
    yield w
    w.finetune_page.stop()


def text_data(tmp_path) -> Path:
    folder = tmp_path / "psalms"
    folder.mkdir()
    (folder / "psalm106.txt").write_text(PSALM)
    (folder / "psalm107.txt").write_text(PSALM.upper())
    return folder


def image_data(tmp_path, n=4, uncaptioned=False) -> Path:
    import numpy as np
    from PIL import Image

    from engine import shapes as S

    folder = tmp_path / "stars"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        sc = S.sample_scene(rng)
        sc = S.Scene(sc.size, sc.colour, "star", sc.position, sc.background)
        Image.fromarray(S.render(sc, 32)).save(folder / f"star{i}.png")
        if not (uncaptioned and i == n - 1):
            (folder / f"star{i}.txt").write_text(S.caption(sc))
    return folder


def select(page, kind: str) -> None:
    page.finetuner.setCurrentIndex(page.finetuner.findData(kind))


def wait_done(qtbot, page, timeout=120_000) -> None:
    qtbot.waitUntil(lambda: not page.busy(), timeout=timeout)


def test_the_page_offers_the_registered_finetuners_with_their_options(window, tmp_path):
    page = window.finetune_page
    host = window.session.host
    assert [page.finetuner.itemData(i) for i in range(page.finetuner.count())] == list(host.finetuners)
    for kind, (trainer, _) in host.finetuners.items():
        select(page, kind)
        assert list(page.form.editors) == [o.name for o in trainer.options]
        assert page.form.values() == {o.name: o.default for o in trainer.options}
        assert page.form.editors["rank"].toolTip() == next(o.help for o in trainer.options if o.name == "rank")
    select(page, "image")
    assert page.model.currentData() == "shapes-diffusion"
    page.set_dataset(str(image_data(tmp_path)))
    assert page.preview.list.count() == 4 and page.preview.count == 4
    captions = [page.preview.list.item(i).text() for i in range(4)]
    assert all("star" in c for c in captions)
    assert not page.preview.list.item(0).icon().isNull()
    select(page, "text")
    page.set_dataset(str(text_data(tmp_path)))
    assert page.preview.list.count() == 2 and "psalm106.txt: Praise ye the LORD" in page.preview.list.item(0).text()
    assert not page.banner.isVisible()
    # a large corpus is previewed from the beginning of its files, not read whole on the window's thread (a 176 MB
    # file blocked it 3.3 s): bytes past the first few kB are never decoded, so this file's bad tail is not seen
    big = tmp_path / "corpus"
    big.mkdir()
    with open(big / "big.txt", "wb") as f:
        f.write(b"Praise ye the LORD. " * 1000)
        f.seek(30_000_000)
        f.write(b"\xff\xfe not UTF-8")
    page.set_dataset(str(big))
    assert not page.banner.isVisible() and page.preview.count == 1
    assert page.preview.summary.text() == "1 text file, 30 MB:"
    assert page.preview.list.item(0).text().startswith("big.txt: Praise ye the LORD.")


def test_a_run_plots_its_loss_cancels_resumes_and_its_adapter_is_used(window, qtbot, tmp_path):
    page = window.finetune_page
    select(page, "text")
    page.set_dataset(str(text_data(tmp_path)))
    page.form.set_values({"steps": 40, "batch": 1, "context": 16, "eval_every": 5, "checkpoint_every": 5,
                          "rank": 4})
    page.start_button.click()
    assert page.busy() and not page.start_button.isEnabled() and page.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: len(page.points["train"][0]) >= 12, timeout=60_000)
    assert page.train_curve.getData()[0] is not None and len(page.train_curve.getData()[0]) >= 12
    assert "s/step" in page.stats.text() and "left" in page.stats.text()
    assert len(page.points["val"][0]) >= 2 and page.sample_text.toPlainText().startswith("— step 5 —")
    page.cancel_button.click()
    wait_done(qtbot, page)
    ck = json.loads((Path(page.run["folder"]) / "checkpoint" / "state.json").read_text())["step"]
    assert ck % 5 == 0 and ck >= 10
    assert page.stats.text().startswith(f"Cancelled; Resume continues from its checkpoint at step {ck}")
    assert page.resume_button.isEnabled() and not page.use_button.isEnabled() and not page.banner.isVisible()
    before = list(zip(*page.points["train"]))[:ck]

    page.resume_button.click()
    assert list(zip(*page.points["train"])) == before  # the plot goes back to the checkpoint, then grows
    wait_done(qtbot, page)
    steps, losses = page.points["train"]
    assert steps == list(range(1, 41)) and list(zip(steps, losses))[:ck] == before
    assert page.points["val"][0] == list(range(5, 41, 5))
    assert page.stats.text().startswith("Done: final loss")
    adapter = Path(page.adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()

    page.use_button.click()
    assert window.current_generator_id() == "text"
    assert window.panel.model.currentData() == "shakespeare-llama"
    assert window.panel.loras.specs() == [f"{adapter}:1"]
    job = window.panel.job()
    assert job.loras == [f"{adapter}:1"] and job.model == "shakespeare-llama"

    from engine.history import History

    row = History().list()[0]  # the finished fine-tune is a history row; opening it selects its adapter
    assert row.generator == "finetune" and row.recipe["kind"] == "text"
    window.select_generator("image")
    window.open_entry(row)
    assert window.current_generator_id() == "text"
    assert window.panel.loras.specs()[-1] == f"{adapter / 'adapter_model.safetensors'}:1"
    page.form.set_values({"steps": 7, "rank": 2})
    window.load_recipe(row.recipe)  # "Load recipe" on the row: the fine-tune's settings back in the page
    assert page.finetuner.currentData() == "text" and page.form.values()["steps"] == 40
    assert page.form.values()["rank"] == 4 and page.data.text() == row.recipe["args"]["data"]


def start_long_text_run(page, qtbot, tmp_path) -> None:
    """A 400-step text run with no periodic checkpoint, started and past its third step."""
    select(page, "text")
    page.set_dataset(str(text_data(tmp_path)))
    page.form.set_values({"steps": 400, "batch": 1, "context": 16, "eval_every": 1000, "checkpoint_every": 1000})
    page.start_button.click()
    qtbot.waitUntil(lambda: len(page.points["train"][0]) >= 3, timeout=60_000)


def test_pause_checkpoints_at_the_current_step(window, qtbot, tmp_path):
    page = window.finetune_page
    start_long_text_run(page, qtbot, tmp_path)
    page.pause_button.click()
    wait_done(qtbot, page)
    ck = json.loads((Path(page.run["folder"]) / "checkpoint" / "state.json").read_text())["step"]
    assert ck == page.points["train"][0][-1]  # no periodic checkpoint yet: Pause wrote this one
    assert page.stats.text() == f"Paused; Resume continues from its checkpoint at step {ck}."
    assert page.resume_button.isEnabled() and not page.banner.isVisible()


def test_a_run_stopped_by_closing_the_studio_is_offered_again(window, qtbot, tmp_path):
    """Closing the studio mid-run paused it with a checkpoint, but the next window had no way to resume it."""
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    page = window.finetune_page
    start_long_text_run(page, qtbot, tmp_path)
    window.persist = True
    window.close()  # pauses the run with a checkpoint and keeps it in the settings
    folder = page.run["folder"]
    step = json.loads((Path(folder) / "checkpoint" / "state.json").read_text())["step"]
    again = MainWindow(Session(isolate=False))
    again.persist = False
    qtbot.addWidget(again)
    assert "Tools > Fine-tune" in again.statusBar().currentMessage()
    again.open_finetune()
    qtbot.addWidget(again.finetune_page)
    reopened = again.finetune_page
    assert reopened.run["folder"] == folder and reopened.resume_button.isEnabled()
    assert f"stopped at step {step}" in reopened.stats.text() and reopened.points["train"][0]
    assert reopened.form.values()["steps"] == 400 and reopened.finetuner.currentData() == "text"
    reopened.resume_button.click()
    qtbot.waitUntil(lambda: len(reopened.points["train"][0]) > step + 1, timeout=60_000)
    reopened.pause_button.click()
    wait_done(qtbot, reopened)
    assert json.loads((Path(folder) / "checkpoint" / "state.json").read_text())["step"] > step


def test_image_samples_appear(window, qtbot, tmp_path):
    page = window.finetune_page
    select(page, "image")
    page.set_dataset(str(image_data(tmp_path)))
    page.form.set_values({"steps": 2, "batch": 2, "eval_every": 1, "sample_steps": 2})
    page.start_button.click()
    wait_done(qtbot, page)
    assert page.stats.text().startswith("Done"), page.banner.message()
    assert page.sample_image.pixmap() is not None and not page.sample_image.pixmap().isNull()
    assert page.sample_title.text().startswith("Samples (step 2")
    assert page.adapter.endswith("adapter.safetensors")
    page.use_button.click()
    assert window.current_generator_id() == "image" and window.panel.loras.specs() == [f"{page.adapter}:1"]
    window.panel.prompt.setPlainText("a large red star in the center on a blue background")
    window.panel.form.set_values({"steps": 2})
    window.panel.set_pickers("torch", "cpu")
    window.generate()
    qtbot.waitUntil(lambda: window.task is None, timeout=60_000)
    assert not window.banner.isVisible(), window.banner.message()
    assert [Path(a["path"]) for a in window.output.recipe["loras"]] == [Path(page.adapter).resolve()]


def test_bad_datasets_show_one_sentence_and_the_window_stays(window, qtbot, tmp_path, monkeypatch):
    page = window.finetune_page
    select(page, "text")
    empty = tmp_path / "empty"
    empty.mkdir()
    page.set_dataset(str(empty))
    assert "holds no text to train on" in page.banner.message() and page.preview.list.count() == 0
    page.start_button.click()
    assert not page.busy() and "holds no text to train on" in page.banner.message()

    page.set_dataset(str(tmp_path / "missing"))
    assert "does not exist" in page.banner.message()

    select(page, "image")
    stars = image_data(tmp_path, uncaptioned=True)
    page.set_dataset(str(stars))
    assert "1 image(s)" in page.banner.message() and "no same-named .txt caption" in page.banner.message()
    assert not page.caption_button.isHidden()  # the offer to write the captions with a caption model
    from studio.gui import caption_folder_dialog

    seen = []

    def captioned(dialog):  # stands in for the user captioning the folder in the dialog
        seen.append(dialog.folder.text())
        (stars / "star3.txt").write_text("a large red star in the center on a blue background")
        return 1

    monkeypatch.setattr(caption_folder_dialog.CaptionFolderDialog, "exec", captioned)
    page.caption_button.click()
    assert seen == [str(stars)] and page.caption_button.isHidden() and not page.banner.isVisible()
    assert page.preview.count == 4

    select(page, "text")  # a problem only the run finds: the text is shorter than one training window
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("Amen.")
    page.set_dataset(str(short))
    assert not page.banner.isVisible()
    page.start_button.click()
    wait_done(qtbot, page)
    message = page.banner.message()
    assert "fewer than one --context window" in message and "Traceback" not in message
    assert page.stats.text() == "Failed." and page.start_button.isEnabled()
    assert window.isVisible() and page.isVisible()


def test_caption_samples_are_captions_and_the_adapter_captions(window, qtbot, tmp_path):
    page = window.finetune_page
    select(page, "caption")
    assert page.samples.currentWidget() is page.sample_text
    page.set_dataset(str(image_data(tmp_path)))
    page.form.set_values({"steps": 4, "batch": 4, "eval_every": 2, "checkpoint_every": 2})
    page.start_button.click()
    wait_done(qtbot, page)
    assert page.stats.text().startswith("Done"), page.banner.message()
    assert page.samples.currentWidget() is page.sample_text
    assert "(true: a " in page.sample_text.toPlainText() and "star" in page.sample_text.toPlainText()
    lines = [ln for ln in page.sample_text.toPlainText().splitlines() if "(true: " in ln]
    assert len(lines) == 8 and all(ln.startswith(("ok  ", "not ")) for ln in lines)  # 4 images at steps 2 and 4
    page.use_button.click()
    assert window.current_generator_id() == "caption" and window.panel.loras.specs() == [f"{page.adapter}:1"]


def test_a_damaged_checkpoint_of_an_earlier_run_does_not_stop_the_page(qtbot, studio_home, tmp_path):
    from engine import state
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    folder = tmp_path / "run"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "state.json").write_text('{"step": 3, "history": [1, "x", null]}')
    settings = state.load_settings()
    settings.gui = {"finetune_run": {"kind": "text", "generator": "text", "data_kind": "text",
                                     "model": "shakespeare-llama", "data": str(tmp_path), "folder": str(folder),
                                     "options": {}}}
    state.save_settings(settings)
    w = MainWindow(Session(isolate=False))
    w.persist = False
    qtbot.addWidget(w)
    w.open_finetune()  # it was "AttributeError"/"TypeError" in a banner, and the page never opened
    qtbot.addWidget(w.finetune_page)
    assert w.finetune_page.isVisible() and not w.banner.isVisible()
    assert "stopped at step 3" in w.finetune_page.stats.text() and w.finetune_page.points["train"][0] == []
