import pytest

from engine.errors import UsageError
from engine.plugins import PluginHost, set_enabled
from plugin_samples import BROKEN_IMPORT, GOOD, INVALID, RAISING_HOOK, drop


def statuses(host):
    return {name: p.status for name, p in host.plugins.items()}


def test_drop_in_plugin_loads_and_registers(studio_home):
    drop(studio_home, "good", GOOD)
    host = PluginHost(builtins=()).load()
    assert host.plugins["good"].status == "loaded"
    assert host.plugins["good"].source == "drop-in"
    assert host.generator("upper").info.title == "Upper"
    assert host.plugin_of("upper") == "good"


def test_failures_are_recorded_and_others_keep_working(studio_home):
    drop(studio_home, "good", GOOD)
    drop(studio_home, "broken", BROKEN_IMPORT)
    drop(studio_home, "raising", RAISING_HOOK)
    drop(studio_home, "invalid", INVALID)
    host = PluginHost(builtins=()).load()
    assert statuses(host) == {"good": "loaded", "broken": "failed", "raising": "failed", "invalid": "failed"}
    assert "this_module_does_not_exist" in host.plugins["broken"].error
    assert "boom in hook" in host.plugins["raising"].error
    assert "invalid" in host.plugins["invalid"].error
    assert "Traceback" in host.plugins["raising"].details
    assert list(host.generators) == ["upper"]


def test_a_plugin_without_hooks_is_failed(studio_home):
    drop(studio_home, "empty", "x = 1\n")
    host = PluginHost(builtins=()).load()
    assert host.plugins["empty"].status == "failed"
    assert "none of the studio hooks" in host.plugins["empty"].error


def test_duplicate_generator_id_is_refused(studio_home):
    drop(studio_home, "a_good", GOOD)
    drop(studio_home, "b_good", GOOD)
    host = PluginHost(builtins=()).load()
    assert host.plugins["a_good"].status == "loaded"
    assert host.plugins["b_good"].status == "failed"
    assert "already registered" in host.plugins["b_good"].error


STEALER = '''
from engine import hookimpl
from engine.architectures import Importer

def export(model, out_dir, options):
    raise RuntimeError("the stealer's exporter ran")

@hookimpl
def register_exporters(register):
    register("llama", export)

@hookimpl
def register_importers(register):
    register(Importer("thief", lambda path: True, lambda source, dest, trust=False: None, "claims everything"))
'''


def test_a_plugin_cannot_take_a_built_in_familys_exporter_or_its_folders(studio_home, tmp_path):
    """A plugin's exporter for "llama" silently replaced the built-in one; an importer that claims every path
    took plain model folders that the built-in Llama reads (import and --model PATH both failed)."""
    import shutil

    from engine.store import BUILTIN_DIR, ModelStore

    drop(studio_home, "zz_steal", STEALER)
    host = PluginHost().load()
    assert host.plugins["zz_steal"].status == "failed"
    assert "exporter of model family 'llama' is already registered by plugin text" in host.plugins["zz_steal"].error
    assert host.exporters["llama"][1] == "text"
    importer_only = STEALER.split("@hookimpl")[0] + "@hookimpl" + STEALER.split("@hookimpl")[2]
    drop(studio_home, "zz_steal", importer_only)
    host = PluginHost().load()
    assert host.plugins["zz_steal"].status == "loaded"
    folder = tmp_path / "mine"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    store = ModelStore(host)
    assert store.get(str(folder)).family == "llama"
    assert store.import_(folder, name="mine").family == "llama"


def test_loading_is_idempotent(studio_home):
    drop(studio_home, "good", GOOD)
    host = PluginHost(builtins=())
    host.load()
    first = dict(host.generators)
    host.load()
    assert host.generators == first


def test_disabled_plugin_is_not_loaded_and_setting_persists(studio_home):
    drop(studio_home, "good", GOOD)
    set_enabled("good", False)
    host = PluginHost(builtins=()).load()
    assert host.plugins["good"].status == "disabled"
    assert "upper" not in host.generators
    set_enabled("good", True)
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"


def test_safe_mode_loads_builtins_only(studio_home, monkeypatch):
    drop(studio_home, "good", GOOD)
    monkeypatch.setenv("STUDIO_SAFE_MODE", "1")
    host = PluginHost(builtins=()).load()
    assert "good" not in host.plugins


def test_unknown_generator_message(studio_home):
    with pytest.raises(UsageError, match="Unknown generator 'nope'"):
        PluginHost(builtins=()).generator("nope")


def test_corrupt_settings_file_falls_back_to_defaults(studio_home):
    (studio_home / "settings.json").write_text("{not json")
    drop(studio_home, "good", GOOD)
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"


def test_every_hook_is_documented():
    from engine import hookspecs
    from engine.plugins import HOOKS

    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__
        assert doc and "Called" in doc and "register" in doc
