"""Issue #13 items outside the fault sweep: a model changed after import, inputs kept by content."""
import numpy as np
from safetensors.numpy import save_file

from engine.replay import replay_notes
from engine.store import ModelStore
from test_store import make_folder, store  # noqa: F401 - the fixture


def test_model_changed_after_import_is_noticed(store, tmp_path):  # noqa: F811
    entry = store.import_(make_folder(tmp_path / "m1"), name="mine")
    assert entry.changed == ""
    weights = entry.path / "model.safetensors"
    save_file({"weight": np.full(4, 2.0, dtype=np.float32)}, str(weights))  # changed in place, same size
    fresh = ModelStore(store.host, builtin_dir=store.builtin_dir).get("mine")
    assert fresh.hash != entry.hash and "changed after it was imported" in fresh.changed
    assert fresh.to_dict()["hash"] == fresh.hash
    notes = replay_notes({"model": {"name": "mine", "hash": entry.hash}}, {"model": {"name": "mine", "hash": fresh.hash}})
    assert any("has changed since" in n for n in notes)


INVERT = '''
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Result

INFO = GeneratorInfo(id="invert", title="Invert", description="Inverts an image.", takes=("image",), makes="image")

def generate(request, context):
    from PIL import Image, ImageOps
    with Image.open(request.image) as im:
        yield Result(image=ImageOps.invert(im.convert("RGB")))

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''


def test_inputs_are_kept_by_content_and_replays_say_why(studio_home, tmp_path):
    import json

    from PIL import Image
    from plugin_samples import drop
    from test_cli import studio

    drop(studio_home, "invert", INVERT)
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (4, 4), "red").save(work / "in.png")
    made = studio("generate", "invert", "--image", "in.png", "--json", check=0, cwd=work)
    history_id = json.loads(made.stdout)["history_id"]
    recipe = json.loads(studio("history", "show", str(history_id), "--json", check=0).stdout)["recipe"]
    assert recipe["image"]["path"] == str(work / "in.png") and (studio_home / "inputs").is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = studio("history", "replay", str(history_id), cwd=elsewhere)  # from another folder: the same input
    assert again.returncode == 0 and "identical" in again.stdout, again.stderr
    Image.new("RGB", (4, 4), "blue").save(work / "in.png")  # a different file of that name
    changed = studio("history", "replay", str(history_id), cwd=elsewhere)
    assert changed.returncode == 0 and "identical" in changed.stdout, changed.stderr
    assert "has changed since" in changed.stderr and "copy the studio kept" in changed.stderr
    (work / "in.png").unlink()
    for kept in (studio_home / "inputs").iterdir():
        kept.unlink()
    gone = studio("history", "replay", str(history_id), cwd=elsewhere)
    assert gone.returncode == 2 and "missing" in gone.stderr and "Traceback" not in gone.stderr


def test_a_slow_plugin_check_says_what_it_waits_for(studio_home, monkeypatch, caplog):
    from engine import plugin_check
    from engine.plugins import PluginHost
    from plugin_samples import GOOD, drop

    monkeypatch.setattr(plugin_check, "SAY_AFTER_S", 0.5)
    drop(studio_home, "slow", "import time\ntime.sleep(2)\n" + GOOD)
    with caplog.at_level("WARNING"):
        assert PluginHost(builtins=()).load().plugins["slow"].status == "loaded"
    assert "Checking the new plugin slow" in caplog.text


def test_verdicts_are_kept_when_the_state_folder_cannot_hold_them(studio_home, monkeypatch, tmp_path):
    from engine import plugin_check
    from engine.plugins import PluginHost
    from plugin_samples import GOOD, drop

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(plugin_check, "_checks_path", lambda: blocker / "plugin_checks.json")  # cannot be written
    drop(studio_home, "good", GOOD)
    checked = []
    monkeypatch.setattr(plugin_check, "_run", lambda cands: checked.extend(c.name for c in cands) or (len(cands), None, ""))
    PluginHost(builtins=()).load()
    plugin_check._MEMORY.clear()  # as a new process: only the fallback file remembers
    PluginHost(builtins=()).load()
    assert checked == ["good"]


def test_a_bad_setting_is_named_once_with_its_file(studio_home, caplog):
    import json

    from engine import state

    (studio_home / "settings.json").write_text(json.dumps({"device": "gpu", "backend": "torch"}))
    state._warned.clear()
    with caplog.at_level("WARNING"):
        for _ in range(3):
            settings = state.load_settings()
    assert settings.device == "auto" and settings.backend == "torch"
    lines = [r.getMessage() for r in caplog.records if "settings" in r.getMessage()]
    assert len(lines) == 1 and "settings.json" in lines[0] and "device" in lines[0] and "'gpu'" in lines[0]


def test_settings_that_cannot_be_saved_blame_the_state_folder(studio_home, monkeypatch, tmp_path):
    import pytest

    from engine import state
    from engine.errors import StateError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(state, "settings_path", lambda: blocker / "settings.json")
    with pytest.raises(StateError, match="Cannot save the settings.*STUDIO_HOME") as err:
        state.save_settings(state.Settings())
    assert "output folder" not in str(err.value)


def test_safe_mode_loads_every_builtin_even_when_disabled(studio_home):
    from engine import state
    from engine.plugins import DEFAULT_PLUGINS, PluginHost

    settings = state.Settings(disabled_plugins=[m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS])
    state.save_settings(settings)
    assert PluginHost(safe_mode=False).load().generators == {}
    assert PluginHost(safe_mode=True).load().generators


def test_cli_messages_name_the_right_thing(studio_home, tmp_path):
    from test_cli import studio

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    shot = studio("gui", "--screenshot", str(blocker / "x.png"), env={"QT_QPA_PLATFORM": "offscreen"})
    assert shot.returncode == 1 and "screenshot" in shot.stderr and "unexpected" not in shot.stderr, shot.stderr
    huge = studio("history", "show", str(10 ** 30))
    assert huge.returncode == 2 and "no generation" in huge.stderr, huge.stderr


def test_saving_settings_never_loses_a_file_it_cannot_read(studio_home):
    """A settings.json with a typo was replaced by defaults at the next change (`studio plugins disable x`), and
    settings this version does not know (a newer version's) were dropped at every save."""
    import json

    from engine import state

    typo = '{\n "device": "cpu", "output_dir": "/tmp/x", "gui": {"theme": "dark"},\n}\n'
    (studio_home / "settings.json").write_text(typo)
    state.save_settings(state.Settings(disabled_plugins=["caption"]))
    kept = list(studio_home.glob("settings.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == typo
    (studio_home / "settings.json").write_text(json.dumps({"device": "cpu", "from_a_newer_version": [1, 2]}))
    state.save_settings(state.Settings(backend="torch"))
    saved = json.loads((studio_home / "settings.json").read_text())
    assert saved["from_a_newer_version"] == [1, 2] and saved["backend"] == "torch"
