"""Fixes from the hostile test (issue #13) that one command shows: thread counts, no display, flags as values,
plugins that print, file modes."""
import json
import os
import stat
import subprocess
import sys

from plugin_samples import GOOD, drop


def studio(*args, home, env=None, drop_env=()):
    full = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0", **(env or {}))
    for name in drop_env:
        full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_huge_thread_counts_are_capped_and_junk_refused(studio_home):
    proc = studio("generate", "text", "--prompt", "A", "--set", "max_new_tokens=2", "--seed", "1", home=studio_home,
                  env={"STUDIO_TORCH_THREADS": "100000"})
    assert proc.returncode == 0 and "more than this machine's" in proc.stderr
    proc = studio("generate", "text", "--prompt", "A", home=studio_home, env={"STUDIO_TORCH_THREADS": "-3"})
    assert proc.returncode == 2 and "STUDIO_TORCH_THREADS must be a whole number" in proc.stderr


def test_no_display_is_one_clear_line(studio_home):
    if not sys.platform.startswith("linux"):
        return
    proc = studio("gui", home=studio_home, drop_env=("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))
    assert proc.returncode == 2 and "No display was found" in proc.stderr and "QT_QPA_PLATFORM=offscreen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_global_flags_are_not_taken_out_of_values(studio_home):
    proc = studio("generate", "text", "--prompt", "--debug", home=studio_home)
    assert proc.returncode == 2 and "--option=VALUE" in proc.stderr and "Traceback" not in proc.stderr
    proc = studio("generate", "text", "--prompt=--safe-mode", "--set", "max_new_tokens=2", "--seed", "1", "--json",
                  home=studio_home)
    assert proc.returncode == 0 and json.loads(proc.stdout)["prompt"] == "--safe-mode"
    listed = studio("--safe-mode", "plugins", "list", home=studio_home)
    assert listed.returncode == 0


def test_a_plugin_that_prints_does_not_corrupt_json(studio_home):
    drop(studio_home, "chatty", "print('hello from a plugin')\n" + GOOD)
    proc = studio("generators", "--json", home=studio_home)
    assert proc.returncode == 0 and "hello from a plugin" in proc.stderr
    assert "upper" in [g["id"] for g in json.loads(proc.stdout)]


def test_outputs_follow_the_umask(studio_home, tmp_path):
    old = os.umask(0o022)
    try:
        proc = studio("generate", "text", "--prompt", "A", "--set", "max_new_tokens=2", "--seed", "1", "--out",
                      str(tmp_path / "a.txt"), home=studio_home)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
