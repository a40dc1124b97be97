import json
import os
import subprocess
import sys

import pytest

from plugin_samples import GOOD, PIXELS, RAISING_GENERATE, BROKEN_IMPORT, drop


def studio(*args, env=None, check=None, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, cwd=cwd)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


@pytest.fixture
def plugins(studio_home):
    drop(studio_home, "good", GOOD)
    drop(studio_home, "pixels", PIXELS)
    drop(studio_home, "crash", RAISING_GENERATE)
    drop(studio_home, "broken", BROKEN_IMPORT)
    return studio_home


def test_generators_json_lists_plugin_generators(plugins):
    found = {g["id"]: g for g in json.loads(studio("generators", "--json", check=0).stdout)}
    assert {"upper", "pixels", "crash"} <= set(found)
    assert found["upper"]["options"][0]["name"] == "repeat"
    assert found["upper"]["plugin"] == "good"


def test_generate_text_json_and_history(plugins, tmp_path):
    out = tmp_path / "o.txt"
    proc = studio("generate", "upper", "--prompt", "hi", "--set", "repeat=2", "--seed", "5", "--out", str(out),
                  "--json", check=0)
    obj = json.loads(proc.stdout)
    for key in ("generator", "model", "backend", "device", "seed", "options", "timings", "text", "token_ids"):
        assert key in obj
    assert obj["text"] == "HI HI" and obj["seed"] == 5 and obj["options"] == {"repeat": 2}
    assert out.read_text() == "HI HI"
    assert json.loads(out.with_name(out.name + ".json").read_text())["seed"] == 5
    listing = json.loads(studio("history", "list", "--json", check=0).stdout)
    assert listing[0]["prompt"] == "hi"
    replay = studio("history", "replay", str(listing[0]["id"]), check=0)
    assert "identical" in replay.stdout


def test_history_list_filters_and_refuses_a_count_below_one(plugins):
    """--generator (as the API's ?generator=) and --limit: 0 listed nothing and a negative limit listed all."""
    studio("generate", "upper", "--prompt", "hi", check=0)
    studio("generate", "pixels", "--prompt", "red", check=0)
    only = json.loads(studio("history", "list", "--json", "--generator", "pixels", check=0).stdout)
    assert [e["generator"] for e in only] == ["pixels"]
    for bad in ("0", "-3"):
        assert "must be 1 or more" in studio("history", "list", f"--limit={bad}", check=2).stderr
    assert len(json.loads(studio("history", "list", "--json", "--limit", "9" * 20, check=0).stdout)) == 2


def test_a_closed_pipe_ends_quietly(plugins):
    """`studio generators | head -1`: the reader closing the pipe was 'unexpected BrokenPipeError'."""
    proc = subprocess.Popen([sys.executable, "-m", "studio.cli", "generators"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "BrokenPipe" not in err and "error" not in err


def test_generate_image_png_carries_recipe(plugins, tmp_path):
    from engine.outputs import read_png_recipe

    out = tmp_path / "p.png"
    obj = json.loads(studio("generate", "pixels", "--prompt", "x", "--seed", "3", "--out", str(out), "--json",
                            check=0).stdout)
    assert obj["width"] == 8 and obj["height"] == 8 and obj["path"] == str(out.resolve())
    assert read_png_recipe(out)["seed"] == 3


def test_batch_prompt_file_writes_a_folder(plugins, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    outdir = tmp_path / "batch"
    lines = studio("generate", "upper", "--prompt-file", str(prompts), "--out", str(outdir), "--json",
                   "--seed", "10", check=0).stdout.splitlines()
    objs = [json.loads(l) for l in lines]
    assert [o["text"] for o in objs] == ["ONE", "TWO"] and [o["seed"] for o in objs] == [10, 11]
    assert len(list(outdir.glob("*.txt"))) == 2


def test_a_batch_from_the_largest_seed_counts_around_to_zero(plugins, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    lines = studio("generate", "upper", "--prompt-file", str(prompts), "--out", str(tmp_path / "b"), "--json",
                   "--seed", str(2**63 - 1), check=0).stdout.splitlines()
    assert [json.loads(l)["seed"] for l in lines] == [2**63 - 1, 0]
    bad = studio("generate", "upper", "--prompt-file", str(prompts), "--seed", "-5")
    assert bad.returncode == 2 and "seed must be a whole number from 0 to 2^63-1, not -5" in bad.stderr


@pytest.mark.parametrize("args,code,message", [
    (("generate", "nope", "--prompt", "x"), 2, "Unknown generator 'nope'"),
    (("generate", "upper", "--prompt", "x", "--set", "repeat=99"), 2, "at most 5"),
    (("generate", "upper", "--prompt", "x", "--set", "colour=red"), 2, "has no option 'colour'"),
    (("generate", "upper", "--prompt", "x", "--set", "repeat"), 2, "KEY=VALUE"),
    (("generate", "upper"), 2, "needs a prompt"),
    (("generate", "upper", "--prompt", "x", "--backend", "tpu"), 2, "invalid choice"),
    (("generate", "crash", "--prompt", "x"), 1, "model exploded"),
    (("models", "info", "ghost"), 2, "Unknown model 'ghost'"),
    (("models", "import", "/no/such/folder"), 2, "/no/such/folder does not exist"),
    (("history", "show", "999"), 2, "no generation 999"),
    (("plugins", "enable", "ghost"), 2, "no plugin called 'ghost'"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_errors_are_one_line_with_exit_codes(plugins, args, code, message):
    proc = studio(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_debug_shows_traceback(plugins):
    proc = studio("--debug", "generate", "crash", "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_a_raising_generator_leaves_history_untouched(plugins):
    studio("generate", "crash", "--prompt", "x")
    assert json.loads(studio("history", "list", "--json", check=0).stdout) == []


def test_plugins_list_shows_failed_plugin_and_safe_mode(plugins):
    listing = {p["name"]: p for p in json.loads(studio("plugins", "list", "--json", check=0).stdout)}
    assert listing["broken"]["status"] == "failed" and "this_module_does_not_exist" in listing["broken"]["error"]
    assert listing["good"]["status"] == "loaded"
    safe = {p["name"] for p in json.loads(studio("--safe-mode", "plugins", "list", "--json", check=0).stdout)}
    assert "good" not in safe
    safe_env = {p["name"] for p in json.loads(studio("plugins", "list", "--json", env={"STUDIO_SAFE_MODE": "1"},
                                                     check=0).stdout)}
    assert "good" not in safe_env


def test_disable_enable_round_trip(plugins):
    studio("plugins", "disable", "good", check=0)
    assert "WARNING" not in studio("generators", check=0).stderr  # the settings it saved read back cleanly
    listing = {p["name"]: p for p in json.loads(studio("plugins", "list", "--json", check=0).stdout)}
    assert listing["good"]["status"] == "disabled"
    assert studio("generate", "upper", "--prompt", "x").returncode == 2
    studio("plugins", "enable", "good", check=0)
    assert studio("generate", "upper", "--prompt", "x").returncode == 0


def test_read_only_state_folder_is_a_clear_error(tmp_path):
    home = tmp_path / "ro-home"
    home.mkdir()
    (home / "plugins").mkdir()
    (home / "plugins" / "good.py").write_text(GOOD)
    home.chmod(0o500)
    try:
        if os.access(home, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        proc = studio("generate", "upper", "--prompt", "x", env={"STUDIO_HOME": str(home)})
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
    finally:
        home.chmod(0o700)


def test_unusable_state_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = studio("history", "list", env={"STUDIO_HOME": str(blocker / "home")})
    assert proc.returncode == 1 and "STUDIO_HOME" in proc.stderr and "Traceback" not in proc.stderr


def test_import_rules():
    code = ("import sys, engine, engine.plugins, engine.store, engine.runner, engine.history;"
            "assert not any(m.startswith('PySide6') for m in sys.modules), 'engine imported Qt'")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; from studio.cli import main; main(['generators']);"
            "assert 'torch' not in sys.modules, 'listing generators imported torch';"
            "assert 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_every_command_that_runs_a_model_takes_the_same_backend_and_device_choices():
    from engine.generators import BACKENDS, DEVICES
    from studio.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "text"], ["chat"], ["caption-folder", "f"], ["queue", "add", "text"]):
        for backend in BACKENDS:
            for device in DEVICES:
                a = parser.parse_args(argv + ["--backend", backend, "--device", device])
                assert (a.backend, a.device) == (backend, device)


def test_export_choices_are_the_exporters_for_export_onnx_and_the_queue():
    from engine.onnx_export import QUANTIZE
    from studio.cli import build_parser

    parser = build_parser()
    for scheme in QUANTIZE[1:]:
        assert parser.parse_args(["export-onnx", "m", "--quantize", scheme]).quantize == scheme
        assert parser.parse_args(["queue", "export", "m", "--quantize", scheme]).quantize == scheme


def test_a_full_disk_is_one_sentence(plugins):
    """`studio generators > /dev/full` was 'unexpected OSError'."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "studio.cli", "generators"], stdout=full, stderr=subprocess.PIPE,
                              env=os.environ.copy(), text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["studio: error: The disk is full (No space left on device); free some "
                                                "space and try again."]


def test_arguments_that_are_not_utf8_are_one_sentence(plugins):
    """A Latin-1 terminal's prompt ('KING\\xff:') was 'TextInputSequence must be str' from the tokenizer, and
    `history list --search` with such a byte 'unexpected UnicodeEncodeError'."""
    for argv in (["generate", "upper", "--prompt", b"KING\xff:"], ["history", "list", "--search", b"\xff"]):
        proc = subprocess.run([sys.executable, "-m", "studio.cli", *argv], capture_output=True, env=os.environ.copy(),
                              timeout=120)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "not UTF-8 text" in err and "unexpected" not in err, err


def test_history_show_says_when_an_output_was_replaced(plugins, tmp_path):
    out = tmp_path / "a.txt"
    first = json.loads(studio("generate", "upper", "--prompt", "one", "--out", str(out), "--json", check=0).stdout)
    second = json.loads(studio("generate", "upper", "--prompt", "two", "--out", str(out), "--overwrite", "--json",
                               check=0).stdout)
    shown = studio("history", "show", str(first["history_id"]), check=0).stdout
    assert f"(replaced since by generation {second['history_id']})" in shown


def test_settings_changed_by_processes_at_once_are_all_kept(plugins):
    """Eight `plugins disable` at once kept 3 to 5 of the 8 names (read, change, write with no lock)."""
    from engine import state

    names = [f"p{i}" for i in range(8)]
    for name in names:
        (plugins / "plugins" / f"{name}.py").write_text("")
    procs = [subprocess.Popen([sys.executable, "-m", "studio.cli", "plugins", "disable", name],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in names]
    assert [p.wait(120) for p in procs] == [0] * 8
    assert set(names) <= set(state.load_settings().disabled_plugins)


def test_closing_the_window_keeps_settings_changed_meanwhile(plugins, qtbot):
    """The window wrote back the whole settings it read at its start: a plugin disabled from a terminal while it
    was open came back enabled when it closed."""
    from engine import state
    from studio.gui.main_window import MainWindow

    w = MainWindow()
    qtbot.addWidget(w)
    studio("plugins", "disable", "crash", check=0)
    w.session.settings.device = "cpu"  # and what the window itself changed is written
    w.close()
    settings = state.load_settings()
    assert "crash" in settings.disabled_plugins and settings.device == "cpu"


def test_two_windows_on_one_state_folder_keep_each_others_changes(plugins, qtbot):
    """The window's settings were one field: of two windows open on one state folder, the one that closed last
    wrote back everything it had read, so the other's conversation (and options) were lost."""
    from engine import chat, state
    from studio.gui.main_window import MainWindow

    first, second = MainWindow(), MainWindow()
    qtbot.addWidget(first)
    qtbot.addWidget(second)
    first.chat.set_conversation([chat.Message("user", "Keep me"), chat.Message("assistant", "Kept")])
    first.close()
    second.select_generator("upper")
    second.panel.seed.setText("77")
    second.close()
    gui = state.load_settings().gui
    assert gui["chat"]["turns"] == [["user", "Keep me"], ["assistant", "Kept"]]
    assert gui["generators"]["upper"]["seed"] == "77" and gui["generator"] == "upper"

    third = MainWindow()  # a window that changes nothing writes nothing over them
    qtbot.addWidget(third)
    third.close()
    assert state.load_settings().gui["chat"] == gui["chat"]

    # a form only looked at is not written over the other window's; a conversation is kept whole, not mixed
    looker, writer = MainWindow(), MainWindow()
    qtbot.addWidget(looker)
    qtbot.addWidget(writer)
    looker.select_generator("upper")
    looker.chat.set_conversation([chat.Message("user", "B's turn")])
    looker.chat.input.setPlainText("B's draft")
    writer.select_generator("upper")
    writer.panel.prompt.setPlainText("written in A")
    writer.chat.system.setPlainText("You are a pirate.")
    writer.chat.set_conversation([chat.Message("user", "Ahoy?")])
    looker.close()
    writer.close()
    gui = state.load_settings().gui
    assert gui["generators"]["upper"]["prompt"] == "written in A"
    assert gui["chat"] == {"system": "", "input": "", "turns": [["user", "Ahoy?"]]}  # (set_conversation clears
    # the system prompt) the writer's conversation whole, without the other window's draft


def test_overwrite_never_replaces_a_json_file_that_is_not_a_recipe(plugins, tmp_path):
    """--out target.txt --overwrite replaced the user's own target.txt.json with the recipe, saying only
    'replacing target.txt'."""
    target = tmp_path / "target.txt"
    target.write_text("old")
    (tmp_path / "target.txt.json").write_text('{"my": "notes"}')
    proc = studio("generate", "upper", "--prompt", "x", "--out", str(target), "--overwrite")
    assert proc.returncode == 2 and "target.txt.json exists and is not a studio recipe" in proc.stderr
    assert (tmp_path / "target.txt.json").read_text() == '{"my": "notes"}'
    (tmp_path / "target.txt.json").unlink()
    studio("generate", "upper", "--prompt", "x", "--out", str(target), "--overwrite", check=0)
    studio("generate", "upper", "--prompt", "y", "--out", str(target), "--overwrite", check=0)  # its own recipe
    assert target.read_text().startswith("Y")


def test_a_settings_file_nested_past_pythons_stack_gives_defaults(plugins):
    (plugins / "settings.json").write_text("[" * 100_000 + "]" * 100_000)
    proc = studio("plugins", "list", check=0)  # it was "unexpected RecursionError", and the window did not open
    assert "is unreadable" in proc.stderr and "using defaults" in proc.stderr


def test_gui_refuses_an_unknown_generator_before_any_window(plugins, capsys, monkeypatch):
    """`studio gui --generator foo` opened the window on another generator; now a usage error, as `generate`'s."""
    import studio.gui.app
    from studio.cli import main

    monkeypatch.setattr(studio.gui.app, "application", lambda: pytest.fail("the window was opened"))
    assert main(["gui", "--generator", ""]) == 2  # (it opened on the last-used generator)
    capsys.readouterr()
    assert main(["gui", "--generator", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("studio: error: Unknown generator 'nope'; the installed generators are:") and "upper" in err
    assert len(err.splitlines()) == 1


def _subparser(parser, *path):
    import argparse

    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_shared_options_and_model_actions_have_help_and_version_prints(capsys, monkeypatch):
    """--prompt, --model, --seed and --set had no help line anywhere, nor `models list/info/import/remove`."""
    import argparse

    from studio.cli import build_parser, package_version

    parser = build_parser()
    for path in (("generate",), ("chat",), ("queue", "add"), ("batch",)):
        sub = _subparser(parser, *path)
        for action in sub._actions:
            if set(action.option_strings) & {"--prompt", "--model", "--seed", "--set", "--lora"}:
                assert action.help, (path, action.option_strings)
    models = next(a for a in _subparser(parser, "models")._actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest: c.help for c in models._choices_actions}
    assert all(helped.get(verb) for verb in ("list", "info", "import", "remove")), helped
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"studio {package_version()}\n"
    import importlib.metadata

    import engine

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == engine.__version__  # a source tree that is not installed says its own


def test_python_dash_m_studio_is_the_command():
    """`python -m studio` said 'studio is a package and cannot be directly executed'."""
    from studio.cli import package_version

    proc = subprocess.run([sys.executable, "-m", "studio", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"studio {package_version()}\n", proc.stderr


def test_a_hand_edited_fine_tune_folder_that_is_not_text_does_not_stop_the_window(plugins, qtbot):
    """{"gui": {"finetune_run": {"folder": 5}}} in settings.json: 'unexpected TypeError', and no window."""
    from engine import state
    from studio.gui.main_window import MainWindow

    state.save_settings(state.Settings(gui={"finetune_run": {"folder": 5}}))
    w = MainWindow()
    qtbot.addWidget(w)
    assert w.current_generator_id()
