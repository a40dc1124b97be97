"""A model's generation_config.json gives its option defaults (issue #15 item 2): they show as the defaults in the
GUI's option form for the chosen model and in `studio generate text --help`, and a generation uses them."""
from __future__ import annotations

import json

import pytest

from tests.onnx_fixtures import text_folder

GEN = {"temperature": 0.3, "top_k": 7, "top_p": 5.0, "do_sample": True}  # top_p out of range: left out


@pytest.fixture
def models(studio_home):
    plain = text_folder(studio_home / "models" / "tiny-plain", "llama")
    tuned = text_folder(studio_home / "models" / "tiny-tuned", "llama", seed=1)
    (tuned / "generation_config.json").write_text(json.dumps(GEN))
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    store = ModelStore(PluginHost().load())
    return store, store.get(plain.name), store.get(tuned.name)


def test_model_option_defaults(models):
    from plugins.text import INFO
    from engine.runner import model_option_defaults

    _, plain, tuned = models
    assert model_option_defaults(INFO, plain) == {}
    assert model_option_defaults(INFO, tuned) == {"temperature": 0.3, "top_k": 7}


def test_generate_help_shows_the_models_defaults(models, capsys):
    from studio.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "text", "--model", "tiny-tuned", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "defaults for model tiny-tuned (* from its generation_config.json)" in out
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) > 3}
    assert "default 0.3*" in line["temperature"] and "default 7*" in line["top_k"]
    assert "default 0.95 " in line["top_p"]  # out of range in the file: the generator's own default
    with pytest.raises(SystemExit):
        main(["generate", "text", "--model", "tiny-plain", "--help"])
    assert "default 0.8 " in capsys.readouterr().out


def test_option_form_shows_the_chosen_models_defaults(models, qtbot):
    from plugins.text import INFO
    from studio.gui.generator_panel import GeneratorPanel

    _, plain, tuned = models
    panel = GeneratorPanel()
    qtbot.addWidget(panel)
    panel.set_generator(INFO, [plain, tuned], "tiny-plain")
    assert panel.form.values()["temperature"] == 0.8 and panel.form.values()["top_k"] == 50
    panel.form.set_values({"max_new_tokens": 17})  # the person's own choice stays across models
    panel.model.setCurrentIndex(panel.model.findData("tiny-tuned"))
    values = panel.form.values()
    assert values["temperature"] == pytest.approx(0.3) and values["top_k"] == 7 and values["top_p"] == 0.95
    assert values["max_new_tokens"] == 17
    assert "generation_config.json" in panel.form.editors["temperature"].toolTip()
    panel.form.set_values({"top_k": 3})
    panel.form.reset()  # Defaults: the model's
    assert panel.form.values()["top_k"] == 7 and panel.form.values()["max_new_tokens"] == 200
    panel.model.setCurrentIndex(panel.model.findData("tiny-plain"))
    assert panel.form.values()["temperature"] == 0.8 and panel.form.values()["top_k"] == 50


def test_generation_uses_the_models_defaults(models, tmp_path):
    from engine.runner import Job, execute, prepare

    store, _, tuned = models
    prep = prepare(store.host, store, Job("text", prompt="w1 w2", model=tuned.name, backend="torch", seed=1,
                                          options={"max_new_tokens": 3}))
    assert prep.request.options["temperature"] == 0.3 and prep.request.options["top_k"] == 7
    assert prep.request.options["top_p"] == 0.95
    rec = execute(prep, out_dir=tmp_path, history=False)
    assert rec.recipe["options"]["temperature"] == 0.3
