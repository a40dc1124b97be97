"""The decoder families of plugins/text/families.py, each a config-driven variation of the one decoder in
plugins/text/llama.py, checked against transformers' own classes on tiny random models saved by transformers:
logits within 1e-4 and 32 greedy tokens identical (issue #15 item 1)."""
from __future__ import annotations

import json

import pytest
import torch

from decoder_checks import greedy
from onnx_fixtures import word_tokenizer

V = 64
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def _llama(**rope):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaConfig(**{**BASE, **rope}), LlamaForCausalLM


def _cases():
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    return {
        "qwen3": lambda: (Qwen3Config(**BASE, head_dim=8, tie_word_embeddings=True), Qwen3ForCausalLM),
        "mistral": lambda: (MistralConfig(**BASE, sliding_window=7, tie_word_embeddings=False), MistralForCausalLM),
        "phi3": lambda: (Phi3Config(**{**BASE, "num_key_value_heads": 4}, sliding_window=9), Phi3ForCausalLM),
        "gemma2": lambda: (Gemma2Config(**BASE, head_dim=8, sliding_window=6, query_pre_attn_scalar=12,
                                        attn_logit_softcapping=3.0, final_logit_softcapping=4.0), Gemma2ForCausalLM),
        "gemma3_text": lambda: (Gemma3TextConfig(**BASE, head_dim=8, sliding_window=6, query_pre_attn_scalar=12,
                                                 layer_types=["sliding_attention", "full_attention"]),
                                Gemma3ForCausalLM),
        "llama-rope-llama3": lambda: _llama(rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "llama-rope-linear": lambda: _llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                             "factor": 4.0}),
        "llama-rope-dynamic": lambda: _llama(max_position_embeddings=16, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    }


FAMILY = {"llama-rope-llama3": "llama", "llama-rope-linear": "llama", "llama-rope-dynamic": "llama"}
CASES = ["qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "llama-rope-llama3", "llama-rope-linear",
         "llama-rope-dynamic"]


def save_tiny(case: str, folder, dtype=torch.float32, shard: str | None = None):
    cfg, cls = _cases()[case]()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.mul_(4.0) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.2)  # norms and biases count too
    model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    word_tokenizer(V).save(str(folder / "tokenizer.json"))
    return model.float().eval()


@pytest.mark.parametrize("case", CASES)
def test_family_matches_transformers(case, tmp_path):
    from plugins.text.models import check_folder, load_model

    folder = tmp_path / case
    ref = save_tiny(case, folder)
    family = FAMILY.get(case, case)
    check_folder(folder, family)
    ours = load_model(folder, family, "cpu", torch.float32)
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(ids, use_cache=False)[0] - ref(input_ids=ids).logits).abs().max()
        assert diff < 1e-4, diff
        want = ref.generate(ids[:1, :5], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert greedy(ours.step, ids[:1, :5]) == want[0, 5:].tolist()


@pytest.mark.parametrize("case,dtype,shard", [("qwen3", torch.bfloat16, "20KB"), ("gemma2", torch.float16, None)])
def test_half_precision_and_sharded_folders(case, dtype, shard, tmp_path):
    from plugins.text.models import load_model

    folder = tmp_path / case
    ref = save_tiny(case, folder, dtype, shard)
    if shard:
        assert (folder / "model.safetensors.index.json").exists()
    ours = load_model(folder, case, "cpu", torch.float32)
    ids = torch.randint(2, V, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert greedy(ours.step, ids) == want[0, 5:].tolist()


def test_unknown_model_type_names_it_and_lists_the_supported(tmp_path):
    from engine.errors import ModelError
    from plugins.text.models import build_model

    with pytest.raises(ModelError, match=r"Unknown model family 'xyz'; supported: llama, gpt2, qwen2, .*gemma2"):
        build_model({"model_type": "xyz"}, "nope")


def test_unsupported_rope_type_is_named(tmp_path):
    from engine.errors import ModelError
    from plugins.text.models import check_folder

    folder = tmp_path / "m"
    save_tiny("llama-rope-linear", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="longrope"):
        check_folder(folder, "llama")


@pytest.mark.parametrize("case", ["qwen3", "mistral", "gemma2", "gemma3_text"])
def test_export_form_computes_the_same(case, tmp_path):
    """The form the ONNX exporter traces (LlamaForCausalLM.fuse_for_export: fused projections, additive masks,
    stacked query groups) gives the same logits as the torch form, past the sliding window."""
    import copy

    from plugins.text.models import load_model

    folder = tmp_path / case
    save_tiny(case, folder)
    ours = load_model(folder, case, "cpu", torch.float32)
    fused = copy.deepcopy(ours).fuse_for_export()
    ids = torch.randint(2, V, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, pa = ours(ids)
        b, pb = fused(ids)
        assert (a - b).abs().max() < 1e-4
        for _ in range(12):
            x = a[:, -1:].argmax(-1)
            a, pa = ours(x, pa)
            b, pb = fused(x, pb)
            assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("case, drop", [("gemma2", "tie_word_embeddings"), ("gemma3_text", "tie_word_embeddings"),
                                        ("qwen2", "use_sliding_window")])
def test_keys_a_config_leaves_out_take_transformers_defaults(case, drop, tmp_path):
    """Gemma's config.json as Google ships it has no tie_word_embeddings (transformers: tied), and was refused
    ('lm_head.weight is missing'); a Qwen2 config without use_sliding_window (transformers: off) got a sliding
    window and other tokens than transformers."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from plugins.text.models import check_folder, load_model

    folder = tmp_path / case
    if case == "qwen2":
        torch.manual_seed(0)
        ref = Qwen2ForCausalLM(Qwen2Config(**BASE, max_window_layers=0)).eval()
        ref.save_pretrained(folder)
        word_tokenizer(V).save(str(folder / "tokenizer.json"))
    else:
        save_tiny(case, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop(drop, None)
    if case == "qwen2":  # as Qwen2.5's own config.json: a window size given, the switch left out, no layer_types
        cfg.pop("layer_types", None)
        cfg["sliding_window"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_folder(folder, case)
    ours = load_model(folder, case, "cpu", torch.float32)
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids, use_cache=False)[0] - ref(input_ids=ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("key, value", [("eos_token_id", "</s>"), ("bos_token_id", 999), ("eos_token_id", [1, -3])])
def test_token_ids_outside_the_vocabulary_are_refused_at_import(key, value, tmp_path):
    """They imported, then every generation failed with a ValueError or an IndexError from torch."""
    from engine.errors import ModelError
    from plugins.text.models import check_folder

    folder = tmp_path / "m"
    save_tiny("mistral", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ModelError, match=f"config.json's {key} is .*must be a token number below"):
        check_folder(folder, "mistral")


def test_a_negative_sliding_window_is_refused(tmp_path):
    from engine.errors import ModelError
    from plugins.text.models import check_folder

    folder = tmp_path / "m"
    save_tiny("mistral", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": -7}))
    with pytest.raises(ModelError, match="sliding_window must be a positive whole number, not -7"):
        check_folder(folder, "mistral")
