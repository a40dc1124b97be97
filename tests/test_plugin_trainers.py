"""Trainers come from plugins (``register_trainers``): `studio train` lists and dispatches whatever is registered."""
import os
import subprocess
import sys

from plugin_samples import drop

TRAINER = '''
import sys
from engine import hookimpl
from engine.generators import Trainer

def run(args):
    if "--help" in args:
        print("usage: studio train sparkle [--steps N]")
        return 0
    print("sparkle trained with", " ".join(args))
    return 3 if "--fail" in args else 0

@hookimpl
def register_trainers(register):
    register(Trainer("sparkle", "Train sparkles", run))
'''

CLASH = '''
from engine import hookimpl
from engine.generators import Trainer

@hookimpl
def register_trainers(register):
    register(Trainer("text", "Another text trainer", lambda args: 0))
'''


def studio(*args, home):
    env = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0")
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_plugin_trainer_is_listed_and_run(studio_home):
    drop(studio_home, "sparkle", TRAINER)
    listed = studio("train", "--help", home=studio_home)
    assert listed.returncode == 0
    for kind in ("text", "image", "caption", "sparkle"):
        assert f"  {kind}" in listed.stdout, listed.stdout
    assert "Train sparkles (plugin sparkle)" in listed.stdout
    ran = studio("train", "sparkle", "--steps", "5", home=studio_home)
    assert ran.returncode == 0 and "sparkle trained with --steps 5" in ran.stdout
    assert studio("train", "sparkle", "--fail", home=studio_home).returncode == 3
    own_help = studio("train", "sparkle", "--help", home=studio_home)
    assert own_help.returncode == 0 and "usage: studio train sparkle" in own_help.stdout


def test_unknown_kind_and_missing_kind_are_usage_errors(studio_home):
    proc = studio("train", "nope", home=studio_home)
    assert proc.returncode == 2 and "Unknown training kind 'nope'; the installed ones are: caption, image, text" in proc.stderr
    proc = studio("train", home=studio_home)
    assert proc.returncode == 2 and "Say what to train" in proc.stderr


def test_a_clashing_trainer_fails_its_plugin_only(studio_home):
    from engine.plugins import PluginHost

    drop(studio_home, "clash", CLASH)
    host = PluginHost(safe_mode=False, disabled=[]).load()
    assert host.plugins["clash"].status == "failed" and "already registered" in host.plugins["clash"].error
    assert host.trainer("text").title.startswith("Train a Llama")
