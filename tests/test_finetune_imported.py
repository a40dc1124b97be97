"""Issue #18, "the imported families that have landed fine-tune too": `studio finetune text` on models imported from
folders saved by transformers (Qwen3, Mistral, Gemma 2), the adapter it writes loading in peft on the transformers
model with the studio's logits. (Stable Diffusion: tests/test_sd_finetune.py.) Phi-3, whose files fuse q/k/v and
gate/up that the studio's network keeps apart: the adapter is saved on the fused layers, as peft's Phi-3 has them,
and a peft adapter on them loads split."""
from __future__ import annotations

import pytest
import torch

from test_text_families import save_tiny

pytest.importorskip("peft")


@pytest.mark.parametrize("case", ["qwen3", "mistral", "gemma2", "phi3"])
def test_imported_family_finetunes_and_peft_reads_the_adapter(tmp_path, studio_home, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.text.finetune import main
    from plugins.text.models import load_model

    save_tiny(case, tmp_path / f"tiny-{case}")
    entry = ModelStore(PluginHost().load()).import_(tmp_path / f"tiny-{case}")
    assert entry.family == case
    text = " ".join(f"w{(i * 7) % 60}" for i in range(600))
    (tmp_path / "data.txt").write_text(text)
    assert main(["--model", entry.name, "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run"),
                 "--steps", "6", "--batch", "2", "--context", "16", "--eval-every", "3", "--checkpoint-every", "3",
                 "--lr", "1e-2", "--threads", "1"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    ours = apply_adapters(load_model(entry.path, entry.family, "cpu", torch.float32),
                          [AdapterRef("a", adapter, "", 1.0)]).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / f"tiny-{case}", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
        got = ours(ids, use_cache=False)[0]
    assert (got - theirs).abs().max() < 1e-4
    assert (theirs - plain).abs().max() > 1e-4  # the adapter learned something
    if case == "phi3":
        import json

        config = json.loads((adapter / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == {"qkv_proj", "o_proj"} and config["rank_pattern"]["qkv_proj"] == 24


def test_a_peft_adapter_on_phi3s_fused_layers_loads_split(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from plugins.text.models import load_model

    save_tiny("phi3", tmp_path / "phi3")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "phi3", torch_dtype=torch.float32).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj",
                                                                                    "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 60, (1, 9), generator=torch.Generator().manual_seed(1))
    ours = apply_adapters(load_model(tmp_path / "phi3", "phi3", "cpu", torch.float32),
                          [AdapterRef("a", tmp_path / "adapter", "", 1.0)])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        got = ours(ids, use_cache=False)[0]
    assert (got - theirs).abs().max() < 1e-4
