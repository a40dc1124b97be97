"""LoRA (engine/nn/lora.py): adapters the studio saves load in peft and give the same logits, and adapters peft
saves load in the studio; kohya files round-trip; bad adapters are refused by name; LoRAs in generation and replay (the fine-tune runs:
tests/test_finetune_runs.py)."""
from __future__ import annotations

import json
import os
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
