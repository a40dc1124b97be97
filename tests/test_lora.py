"""LoRA (engine/nn/lora.py): adapters the studio saves load in peft and give the same logits, and adapters peft
saves load in the studio; kohya files round-trip; bad adapters are refused by name; fine-tuning resumes exactly."""
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
from engine.nn import lora
from onnx_fixtures import text_folder


def _studio_and_hf(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from plugins.text.models import load_model

    folder = text_folder(tmp_path / family, family)
    ours = load_model(folder, family, "cpu", torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return folder, ours, theirs


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family, targets", [("llama", ("q_proj", "v_proj", "down_proj")), ("gpt2", ("c_attn", "c_proj"))])
def test_studio_adapter_loads_in_peft_with_the_same_logits(tmp_path, family, targets):
    from peft import PeftModel

    folder, ours, theirs = _studio_and_hf(tmp_path, family)
    spec = lora.LoraSpec(rank=4, alpha=8, targets=targets)
    paths = lora.wrap(ours, spec)
    assert paths and all(p.rsplit(".", 1)[-1] in targets for p in paths)
    _randomize(ours)
    lora.save_peft(ours, tmp_path / "adapter", spec, base_model=str(folder))
    peft_model = PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids, use_cache=False)[0]
        b = peft_model(input_ids=ids).logits
        plain = theirs.get_base_model()(input_ids=ids).logits if hasattr(theirs, "get_base_model") else None
    assert (a - b).abs().max() < 1e-4
    assert plain is None or (a - plain).abs().max() > 1e-3  # the adapter changes the output


def test_peft_adapter_loads_in_the_studio_with_the_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    folder, ours, theirs = _studio_and_hf(tmp_path, "llama")
    peft_model = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"]))
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path / "theirs")
    adapter = lora.read_adapter(tmp_path / "theirs")
    assert adapter.format == "peft" and adapter.spec.rank == 4 and len(adapter.layers) == 6
    lora.attach(ours, adapter, weight=1.0)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids, use_cache=False)[0] - peft_model(input_ids=ids).logits).abs().max() < 1e-4
    merged = lora.merge(ours)  # folded in: same function, plain layers again
    with torch.no_grad():
        assert (merged(ids, use_cache=False)[0] - peft_model(input_ids=ids).logits).abs().max() < 1e-4
    assert not any(isinstance(m, lora.LoraLayer) for m in merged.modules())


def test_kohya_round_trip_and_weights(tmp_path):
    from plugins.text.models import load_model

    folder = text_folder(tmp_path / "m", "llama")
    model = load_model(folder, "llama", "cpu", torch.float32)
    spec = lora.LoraSpec(rank=2, alpha=1, targets=("q_proj",))
    lora.wrap(model, spec)
    _randomize(model)
    lora.save_kohya(model, tmp_path / "style.safetensors", spec, component="unet")
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(ids, use_cache=False)[0]
    fresh = load_model(folder, "llama", "cpu", torch.float32)
    paths = lora.linear_paths(fresh)
    adapter = lora.read_adapter(tmp_path / "style.safetensors", {"unet": paths})
    assert adapter.format == "kohya" and set(adapter.layers) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    lora.attach(fresh, adapter, weight=0.5, name="a")
    lora.attach(fresh, adapter, weight=0.5, name="b")  # two halves make one whole
    with torch.no_grad():
        assert (fresh(ids, use_cache=False)[0] - want).abs().max() < 1e-5


def test_bad_adapters_are_refused_by_name(tmp_path):
    from plugins.text.models import load_model

    small = load_model(text_folder(tmp_path / "s", "llama"), "llama", "cpu", torch.float32)
    with pytest.raises(UsageError, match="rank of 99 does not fit"):
        lora.wrap(small, lora.LoraSpec(rank=99, targets=("q_proj",)))
    with pytest.raises(UsageError, match="No layer matches the LoRA targets nope.*q_proj"):
        lora.wrap(small, lora.LoraSpec(rank=2, targets=("nope",)))
    other = load_model(text_folder(tmp_path / "g", "gpt2"), "gpt2", "cpu", torch.float32)
    spec = lora.LoraSpec(rank=2, targets=("c_attn",))
    lora.wrap(other, spec)
    lora.save_peft(other, tmp_path / "gpt2-adapter", spec)
    fresh = load_model(text_folder(tmp_path / "s2", "llama"), "llama", "cpu", torch.float32)
    with pytest.raises(UsageError, match="adapts transformer.h.0.attn.c_attn, which this model does not have"):
        lora.attach(fresh, lora.read_adapter(tmp_path / "gpt2-adapter"))
    with pytest.raises(UsageError, match="neither a LoRA folder \\(with adapter_model.safetensors or pytorch_lora"):
        lora.read_adapter(tmp_path / "nothing-here")
    # parts the studio would not apply are refused by name, not dropped (the outputs differed from peft's, silently)
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((tmp_path / "gpt2-adapter" / "adapter_config.json").read_text())
    for key, value in (("use_dora", True), ("lora_bias", True), ("modules_to_save", ["lm_head"])):
        shutil.copytree(tmp_path / "gpt2-adapter", tmp_path / key)
        (tmp_path / key / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(UsageError, match=f"uses PEFT's {key}, which the studio does not apply"):
            lora.read_adapter(tmp_path / key)
    weights = load_file(str(tmp_path / "gpt2-adapter" / "adapter_model.safetensors"))
    extra = {**weights, "base_model.model.transformer.wte.lora_embedding_A": torch.zeros(2, 64)}
    shutil.copytree(tmp_path / "gpt2-adapter", tmp_path / "emb")
    save_file(extra, str(tmp_path / "emb" / "adapter_model.safetensors"))
    with pytest.raises(UsageError, match="holds base_model.model.transformer.wte.lora_embedding_A, a part of a PEFT"):
        lora.read_adapter(tmp_path / "emb")
    kohya = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
             "lora_unet_a.alpha": torch.tensor(2.0), "lora_unet_a.dora_scale": torch.ones(1, 4)}
    save_file(kohya, str(tmp_path / "dora.safetensors"))
    with pytest.raises(UsageError, match="holds lora_unet_a.dora_scale, a part other than kohya LoRA pairs"):
        lora.read_adapter(tmp_path / "dora.safetensors")


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


def _cli(home, *args):
    env = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0")
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_generate_with_lora_replays_and_merges(tmp_path):
    """--lora is applied, recorded by name, hash and weight, replayed exactly; merge-lora makes a model that
    computes what the base plus the adapter computes."""
    from plugins.text.models import load_model

    home = tmp_path / "home"
    home.mkdir()
    base = load_model(text_folder(tmp_path / "base", "llama"), "llama", "cpu", torch.float32)
    assert _cli(home, "models", "import", str(tmp_path / "base"), "--name", "tiny").returncode == 0
    spec = lora.LoraSpec(rank=2, alpha=4, targets=("q_proj", "v_proj", "gate_proj"))
    lora.wrap(base, spec, seed=3)
    _randomize(base)
    lora.save_peft(base, tmp_path / "style", spec)

    args = ("generate", "text", "--model", "tiny", "--prompt", "w1 w2", "--seed", "1", "--set", "temperature=0",
            "--set", "max_new_tokens=12", "--json")
    plain = json.loads(_cli(home, *args).stdout)
    styled = _cli(home, *args, "--lora", f"{tmp_path / 'style'}:0.75")
    assert styled.returncode == 0, styled.stderr
    styled = json.loads(styled.stdout)
    assert styled["token_ids"] != plain["token_ids"]
    recipe = json.loads(_cli(home, "history", "show", str(styled["history_id"]), "--json").stdout)["recipe"]
    assert recipe["loras"][0]["name"] == "style" and recipe["loras"][0]["weight"] == 0.75
    assert len(recipe["loras"][0]["sha256"]) == 64
    replay = _cli(home, "history", "replay", str(styled["history_id"]))
    assert replay.returncode == 0 and "identical" in replay.stdout, replay.stdout + replay.stderr
    (tmp_path / "style").rename(tmp_path / "style-moved")  # the adapter is kept by hash, as inputs are
    replay = _cli(home, "history", "replay", str(styled["history_id"]))
    assert replay.returncode == 0 and "identical" in replay.stdout, replay.stdout + replay.stderr
    assert "the copy the studio kept" in replay.stdout + replay.stderr
    (tmp_path / "style-moved").rename(tmp_path / "style")

    merged = _cli(home, "models", "merge-lora", "tiny", f"{tmp_path / 'style'}:0.75", "--name", "tiny-styled")
    assert merged.returncode == 0, merged.stderr
    folder = home / "models" / "tiny-styled"
    assert json.loads((folder / "studio.json").read_text())["merged_from"]["loras"][0]["weight"] == 0.75
    ours = load_model(tmp_path / "base", "llama", "cpu", torch.float32)
    lora.attach(ours, lora.read_adapter(tmp_path / "style"), weight=0.75)
    flat = load_model(folder, "llama", "cpu", torch.float32)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours(ids, use_cache=False)[0], flat(ids, use_cache=False)[0]
    assert (a - b).abs().max() < 2e-2 * a.abs().max()  # the merged weights are stored in fp16, as the base's

    bad = _cli(home, *args, "--lora", str(tmp_path / "missing.safetensors"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = _cli(home, "generate", "image", "--prompt", "a small red circle", "--lora", str(tmp_path / "style"))
    assert bad.returncode == 2 and "which this model does not have" in bad.stderr


def test_a_lora_file_is_kept_and_replays_from_the_copy(tmp_path, monkeypatch):
    """A kohya .safetensors LoRA used by a generation is kept by hash; a replay after it was deleted or changed
    uses the copy (it failed: 'LoRA ... does not exist')."""
    from engine.recipe import keep_adapter
    from engine.replay import replay_lora
    from engine.runner import adapter_ref

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    file = tmp_path / "ghibli.safetensors"
    file.write_bytes(b"weights v1")
    recorded = keep_adapter(adapter_ref(f"{file}:0.8"))
    assert recorded["kept"].endswith(".safetensors") and recorded["weight"] == 0.8
    notes = []
    assert replay_lora(recorded, notes) == f"{file.resolve()}:0.8" and notes == []
    file.write_bytes(b"weights v2")
    path, weight = replay_lora(recorded, notes).rsplit(":", 1)
    assert open(path, "rb").read() == b"weights v1" and weight == "0.8" and "has changed since" in notes[0]
    file.unlink()
    assert replay_lora(recorded, notes).rsplit(":", 1)[0] == path and "is missing" in notes[1]
    Path(path).unlink()
    with pytest.raises(UsageError, match="The LoRA .* is missing and the studio kept no copy"):
        replay_lora(recorded, notes)


def test_a_peft_folder_is_known_by_its_config_too(tmp_path, monkeypatch):
    """An edited adapter_config.json (lora_alpha) changes the output: a replay took the folder as unchanged (only
    its weights were hashed), and the kept copy, named by the weights alone, held the first config."""
    import json

    from engine.generators import Context, ModelRef, Request
    from engine.recipe import keep_adapter
    from engine.replay import replay_lora
    from engine.runner import adapter_ref

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    folder = tmp_path / "style"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    first = adapter_ref(str(folder))
    recorded = keep_adapter(first)
    assert recorded["config_sha256"] and Path(recorded["kept"]).name.endswith(f"+{recorded['config_sha256']}.peft")
    notes = []
    assert replay_lora(recorded, notes) == f"{folder.resolve()}:1.0" and notes == []
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    second = adapter_ref(str(folder))
    assert second.sha256 == first.sha256 and second != first  # a loaded model with the old alpha is not reused
    ctx, made = Context(), []
    model = ModelRef("m", tmp_path, "any", "h")
    for ref in (first, second):
        ctx.loaded("k", Request(model=model, adapters=(ref,)), lambda: made.append(1))
    assert len(made) == 2
    path = replay_lora(recorded, notes).rsplit(":", 1)[0]
    assert json.loads((Path(path) / "adapter_config.json").read_text())["lora_alpha"] == 8
    assert "has changed since" in notes[0]
    keep_adapter(second)  # the new config gets its own copy; the first stays
    assert replay_lora(recorded, []).rsplit(":", 1)[0] == path
    old = {k: v for k, v in recorded.items() if k not in ("config_sha256", "kept")}  # a recipe from before
    assert replay_lora(old, []) == f"{folder.resolve()}:1.0"


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


def test_a_diffusers_files_per_component_patterns_set_each_layers_scale(tmp_path):
    """rank_pattern / alpha_pattern in a diffusers file's lora_adapter_metadata name modules as the component
    does; they never matched the studio's component/path names, so every layer got the component's scale."""
    from safetensors.torch import save_file

    from engine.nn.lora import read_adapter

    tensors = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4),
               "unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.randn(8, 8),
               "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.randn(8, 8),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2)}
    meta = {"unet.r": 4, "unet.lora_alpha": 4, "unet.rank_pattern": {"mid_block.attentions.0.proj_in": 8},
            "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 16}, "text_encoder.r": 4,
            "text_encoder.lora_alpha": 8,
            "text_encoder.rank_pattern": {"text_model.encoder.layers.0.self_attn.q_proj": 2}}
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    scales = {p: s for p, (_, _, s) in read_adapter(tmp_path).layers.items()}
    assert scales == {"unet/down_blocks.0.attentions.0.proj_in": 1.0, "unet/mid_block.attentions.0.proj_in": 2.0,
                      "text_encoder/encoder.layers.0.self_attn.q_proj": 4.0}


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
