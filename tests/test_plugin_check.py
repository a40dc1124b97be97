"""A plugin that kills or hangs the process that imports it is found in a throwaway process and not loaded."""
import os

from engine import plugin_check
from engine.plugins import PluginHost
from plugin_samples import GOOD, drop

ABORT_AT_IMPORT = "import os\nos.abort()\n"
EXIT_IN_HOOK = '''
import os
from engine import hookimpl

@hookimpl
def register_generators(register):
    os._exit(3)
'''
HANG_AT_IMPORT = "import time\ntime.sleep(600)\n"


def test_a_plugin_that_crashes_the_interpreter_is_not_loaded_and_the_host_lives(studio_home):
    drop(studio_home, "good", GOOD)
    drop(studio_home, "aborts", ABORT_AT_IMPORT)
    drop(studio_home, "exits", EXIT_IN_HOOK)
    host = PluginHost(builtins=()).load()  # without the check, this process would die here
    assert host.plugins["good"].status == "loaded"
    assert list(host.generators) == ["upper"]
    aborts, exits = host.plugins["aborts"], host.plugins["exits"]
    assert (aborts.status, exits.status) == ("failed", "failed")
    assert "ended the test process that loaded it (signal 6, SIGABRT)" in aborts.error
    assert "(exit code 3)" in exits.error
    assert "good" in plugin_check.passed() and "aborts" not in plugin_check.passed()


def test_a_plugin_that_hangs_while_loading_is_not_loaded(studio_home, monkeypatch):
    monkeypatch.setattr(plugin_check, "TIMEOUT_S", 3)
    drop(studio_home, "hangs", HANG_AT_IMPORT)
    host = PluginHost(builtins=()).load()
    assert host.plugins["hangs"].status == "failed"
    assert "did not finish loading within 3 s" in host.plugins["hangs"].error


def test_each_version_of_a_plugin_is_checked_once(studio_home, monkeypatch):
    path = drop(studio_home, "good", GOOD)
    PluginHost(builtins=()).load()
    checked = []
    monkeypatch.setattr(plugin_check, "_run", lambda names: checked.extend(names) or (names, None, "", ""))
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"
    assert checked == []  # passed before, unchanged since
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the plugin was edited
    PluginHost(builtins=()).load()
    assert checked == ["good"]


def test_the_check_can_be_turned_off(studio_home, monkeypatch):
    monkeypatch.setenv("STUDIO_PLUGIN_CHECK", "0")
    monkeypatch.setattr(plugin_check, "_run", lambda names: (_ for _ in ()).throw(AssertionError("checked")))
    drop(studio_home, "good", GOOD)
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"
