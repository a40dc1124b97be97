"""A plugin that kills or hangs the process that imports it is found in a throwaway process and not loaded."""
import os
import sys
import time

from engine import plugin_check
from engine.plugins import Candidate, PluginHost
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


def no_check(names):
    raise AssertionError("checked again")


def test_a_plugin_that_crashes_the_interpreter_is_not_loaded_and_the_host_lives(studio_home):
    drop(studio_home, "good", GOOD)
    drop(studio_home, "aborts", 'print("loading weights")\nprint("ok 1")\n' + ABORT_AT_IMPORT)  # prints mislead nothing
    drop(studio_home, "exits", EXIT_IN_HOOK)
    drop(studio_home, "quits", "import os\nos._exit(0)\n")  # a clean exit status while loading is a crash too
    host = PluginHost(builtins=()).load()  # without the check, this process would die here
    assert host.plugins["good"].status == "loaded"
    assert list(host.generators) == ["upper"]
    error = {name: host.plugins[name].error for name in ("aborts", "exits", "quits")}
    assert "ended the test process that loaded it (signal 6, SIGABRT)" in error["aborts"]
    assert "(exit code 3)" in error["exits"] and "(exit code 0)" in error["quits"]
    assert "`studio plugins disable aborts`" in error["aborts"]
    assert "loading weights" in host.plugins["aborts"].details  # its own output, for the details
    assert "loading weights" not in host.plugins["exits"].details


def test_verdicts_are_remembered_until_the_plugin_changes(studio_home, monkeypatch):
    good = drop(studio_home, "good", GOOD)
    drop(studio_home, "aborts", ABORT_AT_IMPORT)
    PluginHost(builtins=()).load()
    monkeypatch.setattr(plugin_check, "_run", no_check)
    host = PluginHost(builtins=()).load()
    assert host.plugins["good"].status == "loaded" and "SIGABRT" in host.plugins["aborts"].error
    checked = []
    monkeypatch.setattr(plugin_check, "_run", lambda cands: checked.extend(c.name for c in cands) or (len(cands), None, ""))
    st = os.stat(good)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the plugin was edited
    PluginHost(builtins=()).load()
    assert checked == ["good"]


def test_a_plugin_that_hangs_while_loading_is_not_loaded(studio_home, monkeypatch):
    monkeypatch.setattr(plugin_check, "TIMEOUT_S", 3)
    drop(studio_home, "hangs", HANG_AT_IMPORT)
    host = PluginHost(builtins=()).load()
    assert host.plugins["hangs"].status == "failed"
    assert "did not finish loading within 3 s" in host.plugins["hangs"].error


def test_a_plugin_that_starts_a_long_lived_process_is_not_taken_for_hung(studio_home, monkeypatch, tmp_path):
    monkeypatch.setattr(plugin_check, "TIMEOUT_S", 5)
    monkeypatch.setenv("STUDIO_PLUGIN_CHECK_SPAWNED", str(tmp_path / "pid"))
    drop(studio_home, "spawns", 'import os, subprocess, sys\n'
                                'if os.environ.get("STUDIO_PLUGIN_CHECK") == "0":  # only in the check process\n'
                                '    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])\n'
                                '    open(os.environ["STUDIO_PLUGIN_CHECK_SPAWNED"], "w").write(str(p.pid))\n' + GOOD)
    assert PluginHost(builtins=()).load().plugins["spawns"].status == "loaded"
    if sys.platform.startswith("linux"):  # what the plugin started in the throwaway process ended with it
        pid = int((tmp_path / "pid").read_text())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_a_crashing_drop_in_named_like_a_built_in_does_not_fail_the_built_in(studio_home):
    drop(studio_home, "text", ABORT_AT_IMPORT)
    host = PluginHost().load()
    assert host.plugins["text"].status == "loaded" and host.plugins["text"].source == "built-in"
    assert "already called 'text'" in host.plugins["text (drop-in)"].error


def test_the_fingerprint_follows_the_code_not_its_caches(tmp_path):
    pkg = tmp_path / "plug"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    cand = Candidate("plug", "drop-in", "", str(pkg), lambda: None, str(pkg))
    before = plugin_check.fingerprint(cand)
    (pkg / "__pycache__" / "plug.cpython-311.pyc").write_bytes(b"0" * 10)
    assert plugin_check.fingerprint(cand) == before
    (pkg / "native.so").write_bytes(b"new build")
    assert plugin_check.fingerprint(cand) != before
    # an editable install: the .dist-info folder stays, the source tree it points at changes
    src, info = tmp_path / "src", tmp_path / "plug-1.0.dist-info"
    src.mkdir()
    info.mkdir()
    (src / "mod.py").write_text("x = 1\n")
    (info / "direct_url.json").write_text('{"url": "%s", "dir_info": {"editable": true}}' % src.as_uri())
    cand = Candidate("plug", "entry point", "1.0", "mod:plugin", lambda: None, str(info))
    before = plugin_check.fingerprint(cand)
    (src / "mod.py").write_text("x = 22\n")
    assert plugin_check.fingerprint(cand) != before


def test_the_check_can_be_turned_off(studio_home, monkeypatch):
    monkeypatch.setenv("STUDIO_PLUGIN_CHECK", "0")
    monkeypatch.setattr(plugin_check, "_run", no_check)
    drop(studio_home, "good", GOOD)
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"


def test_when_the_check_process_cannot_run_no_plugin_is_blamed(studio_home, monkeypatch, caplog):
    monkeypatch.setattr(plugin_check.sys, "executable", "/bin/false")  # exits at once, before loading anything
    drop(studio_home, "good", GOOD)
    assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"
    assert "new plugins load without it" in caplog.text
    assert plugin_check.verdicts() == {}  # nothing remembered: checked again next time


def test_a_damaged_verdict_file_only_means_checking_again(studio_home):
    drop(studio_home, "good", GOOD)
    path = studio_home / "plugin_checks.json"
    for text in ("{broken", "[1, 2]", '{"drop-in:%s": 5}' % (studio_home / "plugins" / "good.py")):
        path.write_text(text)
        assert PluginHost(builtins=()).load().plugins["good"].status == "loaded"
        assert isinstance(plugin_check.verdicts()[f"drop-in:{studio_home / 'plugins' / 'good.py'}"], dict)


def test_enabling_a_plugin_checks_it_again(studio_home, monkeypatch):
    from engine.plugins import set_enabled

    drop(studio_home, "aborts", ABORT_AT_IMPORT)
    assert PluginHost(builtins=()).load().plugins["aborts"].status == "failed"
    run, checked = plugin_check._run, []
    monkeypatch.setattr(plugin_check, "_run", lambda cands: checked.extend(c.name for c in cands) or run(cands))
    PluginHost(builtins=()).load()
    assert checked == []  # the failure is remembered
    set_enabled("aborts", True)  # the user thinks it was a one-off
    assert PluginHost(builtins=()).load().plugins["aborts"].status == "failed" and checked == ["aborts"]


def test_the_window_does_not_check_disabled_plugins(studio_home, monkeypatch):
    from engine.plugins import set_enabled
    from studio.gui.session import Session

    drop(studio_home, "aborts", ABORT_AT_IMPORT)
    set_enabled("aborts", False)
    monkeypatch.setattr(plugin_check, "_run", no_check)
    session = Session(host_kwargs={"builtins": []}, isolate=False)
    assert not session.plugins_need_check()
    session.check_new_plugins()  # would raise "checked again" if it ran the check
    assert session.host.plugins["aborts"].status == "disabled"
