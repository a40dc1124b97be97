"""Qwen2 / Qwen2.5 (a Llama with biases on q, k and v): one entry in plugins/text/families.py and one config option
in llama.py. Checked against transformers' own Qwen2ForCausalLM on a tiny random model saved by transformers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from onnx_fixtures import word_tokenizer


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen2"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4.0) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.2)  # biases and norms count too
    model.save_pretrained(folder)
    word_tokenizer(64).save(str(folder / "tokenizer.json"))
    return folder, model


def test_logits_and_greedy_tokens_match_transformers(qwen):
    from plugins.text.models import load_model

    folder, ref = qwen
    ours = load_model(folder, "qwen2", "cpu", torch.float32)
    assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids, use_cache=False)[0] - ref(input_ids=ids).logits).abs().max() < 1e-4
        want = ref.generate(ids[:1, :5], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        past, x, got = None, ids[:1, :5], []
        for _ in range(32):
            logits, past = ours.step(x, past)
            x = logits.argmax(-1, keepdim=True)
            got.append(int(x))
    assert got == want[0, 5:].tolist()


def test_imports_generates_and_exports_through_the_gate(qwen, tmp_path):
    folder, _ = qwen
    env = dict(os.environ, STUDIO_HOME=str(tmp_path), STUDIO_PLUGIN_CHECK="0")

    def studio(*args):
        return subprocess.run([sys.executable, "-m", "studio.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    imported = studio("models", "import", str(folder), "--name", "qwen")
    assert imported.returncode == 0 and "qwen2" in imported.stdout, imported.stderr
    args = ("generate", "text", "--model", "qwen", "--prompt", "w3 w4 w5", "--set", "temperature=0", "--set",
            "max_new_tokens=16", "--seed", "1", "--json")
    on_torch = json.loads(studio(*args).stdout)
    exported = studio("export-onnx", "qwen")
    assert exported.returncode == 0, exported.stderr
    on_onnx = json.loads(studio(*args, "--backend", "onnx").stdout)
    assert on_onnx["token_ids"] == on_torch["token_ids"] and len(on_torch["token_ids"]) == 16
