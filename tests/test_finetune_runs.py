"""Fine-tune runs (`studio finetune`): a killed run resumes to the same loss, a diverging one stops with its
checkpoint, flags are checked by their option ranges, run folders, pause, empty captions, progress lines and the
time left."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import UsageError


def _finetune(home, out, *extra, steps=8):
    env = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0")
    return [sys.executable, "-m", "studio.cli", "finetune", "text", "--model", "shakespeare-llama", "--data",
            str(home / "data.txt"), "--out", str(out), "--steps", str(steps), "--batch", "2", "--context", "32",
            "--eval-every", "4", "--checkpoint-every", "2", "--threads", "1", "--json", *extra], env


def test_a_killed_finetune_resumes_to_the_same_loss(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    text = (os.path.join(os.path.dirname(__file__), "..", "README.md"))
    (home / "data.txt").write_text(open(text, encoding="utf-8").read() * 2)
    cmd, env = _finetune(home, tmp_path / "straight")
    straight = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    want = [json.loads(line) for line in straight.stdout.splitlines() if line.startswith('{"step"')]
    assert [e["step"] for e in want] == list(range(1, 9))

    cmd, env = _finetune(home, tmp_path / "killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith('{"step": 5'):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    cmd, env = _finetune(home, tmp_path / "killed", "--resume")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith('{"step"')]
    assert got[0]["step"] in (5, 6, 7)  # from the last checkpoint (every 2 steps) before the kill
    assert abs(got[-1]["loss"] - want[-1]["loss"]) < 1e-4 and got[-1]["step"] == 8
    assert abs(got[-1]["val_loss"] - want[-1]["val_loss"]) < 1e-4
    assert (tmp_path / "killed" / "adapter" / "adapter_model.safetensors").is_file()

    cmd, env = _finetune(home, tmp_path / "killed")  # a finished run folder is not silently overwritten
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_a_diverging_finetune_stops_and_keeps_the_checkpoint(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "data.txt").write_text("to be or not to be, that is the question " * 40)
    cmd, env = _finetune(home, tmp_path / "nan", "--lr", "1e30", "--checkpoint-every", "1", steps=6)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "The loss became" in proc.stderr and "Traceback" not in proc.stderr
    assert "the last good checkpoint, step 1, is kept" in proc.stderr
    assert json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())["step"] == 1
    cmd, env = _finetune(home, tmp_path / "nan-at-once", "--lr", "1e30", steps=6)  # diverges before any checkpoint
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no checkpoint was written yet" in proc.stderr


@pytest.mark.parametrize("module", ["plugins.text.finetune", "plugins.image.finetune", "plugins.caption.finetune",
                                    "plugins.stable_diffusion.finetune"])
def test_finetune_flags_are_checked_by_their_option_ranges(module, capsys):
    """Every fine-tuner's flag is parsed by its Option, as the window's form checks it: ``--dropout 5`` was an
    'unexpected ValueError' from torch, ``--eval-every 0`` a division by zero; the loop's warm-up, weight decay and
    clipping are flags too, and every value reaches the training Settings."""
    import importlib

    from engine.finetune import Settings, device_of, settings_from

    mod = importlib.import_module(module)
    base = ["--model", "m", "--data", "d"]
    for o in mod.OPTIONS:
        if o.type in ("int", "float") and (o.min is not None or o.max is not None):
            bad = o.min - 1 if o.min is not None else o.max + 1
            with pytest.raises(SystemExit) as exit_:
                mod.parse_args(base + ["--" + o.name.replace("_", "-"), str(bad)])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert f"argument --{o.name.replace('_', '-')}: must be at" in err and "Traceback" not in err
    a = mod.parse_args(base + ["--warmup", "0", "--weight-decay", "0.01", "--clip", "0.5", "--seed", "3"])
    got = settings_from(a)
    assert isinstance(got, Settings) and (got.warmup, got.weight_decay, got.clip, got.seed) == (0, 0.01, 0.5, 3)
    # where it trains: --device auto (a GPU when there is one), cpu or cuda; cuda on a machine without one is a
    # sentence before any model loads
    assert device_of(a) == ("cuda" if torch.cuda.is_available() else "cpu") and a.device == device_of(a)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA GPU"):
            device_of(mod.parse_args(base + ["--device", "cuda"]))


def test_run_folders_are_the_runs_own_and_resume_keeps_the_settings(tmp_path, studio_home):
    """--out into a dataset, a model folder or the model store gained a run's files; two runs into one folder both
    'succeeded' and the second replaced the first's adapter; --resume with other settings made an adapter that
    its history row did not describe (and --rank was 'unexpected RuntimeError')."""
    from engine.errors import UsageError
    from engine.finetune import Settings, run
    from engine.runfolder import refuse_foreign_folder, run_lock
    from engine.jobsave import owner_id
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.text.finetune import TextTask, parse_args

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("to be or not to be, that is the question " * 40)
    with pytest.raises(UsageError, match="holds files a fine-tune run does not write \\(a.txt\\)"):
        refuse_foreign_folder(data)
    with pytest.raises(UsageError, match="is in the model store"):
        refuse_foreign_folder(studio_home / "models" / "x")
    builtin = Path(__file__).resolve().parents[1] / "resources" / "models" / "shakespeare-llama"
    with pytest.raises(UsageError, match="config.json"):
        refuse_foreign_folder(builtin)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(owner_id())  # a run of a live process (this one) holds it
    with pytest.raises(UsageError, match="Another fine-tune .* is writing to"):
        with run_lock(out):
            pass
    (out / "run.lock").write_text("elsewhere-host-that-is-not-here:1")  # another machine's lock cannot be checked
    with run_lock(out):  # ... so it is taken over, as a dead process's
        assert (out / "run.lock").read_text() == owner_id()
    assert not (out / "run.lock").exists()

    entry = ModelStore(PluginHost().load()).get("shakespeare-llama")
    args = ["--model", "shakespeare-llama", "--data", str(data), "--context", "16", "--batch", "2"]
    settings = Settings(steps=4, lr=1e-3, batch=2, seed=0, checkpoint_every=2, eval_every=4, warmup=0,
                        weight_decay=0.0, clip=1.0)
    run(TextTask(entry, {"a.txt": (data / "a.txt").read_text()}, parse_args(args)), settings, out)
    bigger = Settings(**{**settings.__dict__, "lr": 0.5})
    with pytest.raises(UsageError, match="started with --lr 0.001, not 0.5"):
        run(TextTask(entry, {"a.txt": (data / "a.txt").read_text()}, parse_args(args)), bigger, out, resume=True)
    with pytest.raises(UsageError, match="started with other LoRA settings"):
        run(TextTask(entry, {"a.txt": (data / "a.txt").read_text()}, parse_args(args + ["--rank", "4"])), settings,
            out, resume=True)


def test_a_finetune_row_replays_from_any_folder(tmp_path):
    """The row kept --data as typed ("d1"), so a replay from another folder said "d1 does not exist"."""
    from engine.finetune import rerun_args

    old_row = {"args": {"model": "m", "data": "d1", "steps": 3}, "finetune": {"data": {"path": "/abs/d1"}}}
    assert rerun_args(old_row, tmp_path / "o")[:6] == ["--model", "m", "--data", "/abs/d1", "--steps", "3"]


def test_pause_while_preparing_big_text_and_context_are_not_lost(tmp_path, studio_home):
    """SIGTERM (the window's Pause) that came while the data was prepared was lost and the run trained to its end;
    a 1 GB text file ran the machine out of memory; --context past the model's was clamped silently."""
    import signal

    from engine.errors import CancelledError
    from engine.finetune import Settings, run, stop_token
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.text.finetune import TextTask, main, parse_args

    data = tmp_path / "a.txt"
    data.write_text("to be or not to be, that is the question " * 40)
    base = ["--model", "shakespeare-llama", "--data", str(data), "--batch", "2"]
    entry = ModelStore(PluginHost().load()).get("shakespeare-llama")
    with pytest.raises(UsageError, match="--context 100000 is longer than shakespeare-llama reads"):
        TextTask(entry, {"a.txt": data.read_text()}, parse_args(base + ["--context", "100000"]))
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(65_000_000)
    with pytest.raises(UsageError, match="holds 65 MB of text; the text fine-tuner reads at most 64 MB"):
        main(["--model", "shakespeare-llama", "--data", str(big), "--out", str(tmp_path / "o")])

    old = signal.getsignal(signal.SIGTERM)
    try:
        a = parse_args(base + ["--context", "16"])
        os.kill(os.getpid(), signal.SIGTERM)  # the Pause arrives while the task is being built
        task = TextTask(entry, {"a.txt": data.read_text()}, a)
        assert stop_token().cancelled
        settings = Settings(steps=4, lr=1e-3, batch=2, seed=0, checkpoint_every=2, eval_every=4, warmup=0,
                            weight_decay=0.0, clip=1.0)
        with pytest.raises(CancelledError, match="stopped at step 0"):
            run(task, settings, tmp_path / "p", cancel=stop_token())
        assert (tmp_path / "p" / "checkpoint" / "state.json").is_file()  # Resume continues from here
    finally:
        signal.signal(signal.SIGTERM, old)


def test_empty_captions_are_noted(tmp_path, capsys):
    """An empty caption trains the model with no prompt (sometimes meant, often a forgotten file): said, not silent."""
    import argparse

    from PIL import Image

    from engine.finetune import captioned_data

    for i, caption in enumerate(["a red star", "", "  "]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(caption)
    pairs, prior = captioned_data(argparse.Namespace(data=str(tmp_path)))
    assert len(pairs) == 3 and prior == []
    assert "note: 2 image(s) have an empty caption (im1.png, im2.png)" in capsys.readouterr().err


def test_time_left_comes_from_the_recent_steps_and_counts_the_evaluations_to_come():
    """The estimate averaged every step since the start (a slow first step made it high) and counted evaluations and
    checkpoints only as a share of the steps done (it was ~45 % low before the first one)."""
    from engine.pace import Pace, WINDOW, still_to_come

    assert [still_to_come(d, 100, 25) for d in (0, 24, 25, 99, 100)] == [4, 4, 3, 1, 0]
    assert still_to_come(0, 110, 25) == 5  # 25, 50, 75, 100 and the last step
    pace = Pace(total=100, eval_every=25, checkpoint_every=50)
    pace.step(5.0)  # the first step warms up
    assert pace.eta(1) == 5.0 * 99  # alone, it is all there is
    for _ in range(WINDOW + 5):
        pace.step(2.0)
    for _ in range(WINDOW):
        pace.step(1.0)  # the pace now
    pace.evaluated(10.0)
    pace.checkpointed(3.0)
    assert pace.seconds_per_step() == 1.0
    assert pace.eta(50) == 50 * 1.0 + 2 * 10.0 + 1 * 3.0  # evaluations at 75 and 100, a checkpoint at 100


def test_finetune_prints_a_step_line_every_two_seconds(capsys):
    """One line per step scrolled the terminal: now the first and the last step, each evaluation, and one every
    PRINT_EVERY_S."""
    from engine.pace import PRINT_EVERY_S, progress_printer

    now = [0.0]
    report = progress_printer(False, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = step * 0.5
        event = {"step": step, "total": 10, "loss": 1.0, "seconds_per_step": 0.5, "eta_s": 5 - step * 0.5}
        if step == 7:
            event["val_loss"] = 1.1
        report(event)
    printed = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()]
    assert PRINT_EVERY_S == 2.0 and printed == [1, 5, 7, 10]  # 1; 5 (2 s after 1); 7 evaluated; 10 the last
    report = progress_printer(True, clock=lambda: now[0])
    for step in (1, 2):
        report({"step": step, "total": 2, "loss": 1.0, "seconds_per_step": 0.5, "eta_s": 0.0})
    assert len(capsys.readouterr().out.splitlines()) == 2  # --json: every step
