"""GGUF import (issue #15 item 3): tiny random Llama and Qwen2 models saved by transformers, written to GGUF the
way llama.cpp's convert script does (the gguf package's writer; Llama's q/k rows permuted), imported with
`studio models import x.gguf`, generate the greedy tokens of the safetensors original (F16: all 32; Q8_0: at least
30 of 32), and the rebuilt tokenizer gives the original tokenizer.json's ids on a 10 kB multilingual text."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from decoder_checks import greedy
from test_text_hub_folders import TEXT

gguf = pytest.importorskip("gguf")

H, V = 64, 320


def _permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT] * 20, vocab_size=V, min_frequency=1, special_tokens=["<|end|>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _model(arch: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
              tie_word_embeddings=arch == "qwen2", **extra)
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model


def write_gguf(model, arch: str, tokenizer_json, path, qtype, extra: dict | None = None):
    from gguf.quants import quantize

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    tj = json.loads(tokenizer_json.read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|end|>" else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for k, t in state.items():
        if k in names:
            name = names[k]
        else:
            _, _, n, rest = k.split(".", 3)
            name = f"blk.{n}.{layer[rest]}"
        a = t.float().numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        if a.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _greedy(model, ids, n=32):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch,qname,need", [("llama", "F16", 32), ("qwen2", "F16", 32), ("llama", "Q8_0", 30),
                                             ("qwen2", "Q8_0", 30)])
def test_gguf_imports_and_generates_the_original_tokens(arch, qname, need, bpe, tmp_path):
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.text.models import load_model

    ref = _model(arch)
    path = tmp_path / f"tiny-{arch}.{qname}.gguf"
    write_gguf(ref, arch, bpe, path, gguf.GGMLQuantizationType[qname])
    store = ModelStore(PluginHost(safe_mode=True, disabled=[]).load(), user_dir=tmp_path / "models")
    entry = store.import_(path)
    assert entry.family == arch and entry.name == path.stem
    tcfg = json.loads((entry.path / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"].startswith("{% for m in messages %}") and tcfg["eos_token"] == "<|end|>"
    ours = load_model(entry.path, arch, "cpu", torch.float32)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(2))
    want = _greedy(ref.half().float() if qname == "F16" else ref, ids)
    got = greedy(ours.step, ids)
    agree = sum(a == b for a, b in zip(got, want))
    assert agree >= need, (agree, got, want)


def test_llama3_rope_scaling_is_carried_over_from_rope_freqs(bpe, tmp_path):
    """llama.cpp stores Llama 3.1/3.2's rope scaling only as a ``rope_freqs`` tensor of factors; the import skipped
    it, and the model ran with unscaled positions (75 % of transformers' greedy tokens, nothing said). The factors
    are now matched to Llama 3's scaling parameters and written into config.json."""
    from engine.gguf import llama3_factors
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.text.models import load_model

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    ref = _model("llama", rope_parameters=rope)
    factors = llama3_factors(10000.0, H // 4, 8.0, 1.0, 4.0, 16).astype(np.float32)
    path = tmp_path / "tiny-llama3.F16.gguf"
    write_gguf(ref, "llama", bpe, path, gguf.GGMLQuantizationType.F16, extra={"rope_freqs.weight": factors})
    entry = ModelStore(PluginHost(safe_mode=True, disabled=[]).load(), user_dir=tmp_path / "models").import_(path)
    assert json.loads((entry.path / "config.json").read_text())["rope_scaling"] == {
        k: v for k, v in rope.items() if k != "rope_theta"}
    ours = load_model(entry.path, "llama", "cpu", torch.float32)
    ids = torch.randint(1, V, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids, use_cache=False)[0] - ref.half().float()(input_ids=ids).logits).abs().max()
    assert diff < 2e-2, diff  # fp16 weights on both sides; unscaled positions were 0.35 away

    odd = tmp_path / "odd.F16.gguf"
    write_gguf(ref, "llama", bpe, odd, gguf.GGMLQuantizationType.F16,
               extra={"rope_freqs.weight": np.linspace(1, 3, H // 8).astype(np.float32)})
    from engine.errors import ModelError

    with pytest.raises(ModelError, match="other than Llama 3's"):
        ModelStore(PluginHost(safe_mode=True, disabled=[]).load(), user_dir=tmp_path / "models").import_(odd)


def test_rebuilt_tokenizer_gives_the_original_ids(bpe, tmp_path):
    from tokenizers import Tokenizer

    from engine.gguf import _fields, read_gguf, tokenizer_from_metadata

    path = tmp_path / "t.gguf"
    write_gguf(_model("qwen2"), "qwen2", bpe, path, gguf.GGMLQuantizationType.F16)
    ours = tokenizer_from_metadata(_fields(read_gguf(path)), path)
    ref = Tokenizer.from_file(str(bpe))
    text = TEXT * 40 + "<|end|>"
    assert len(text.encode()) > 10_000
    assert ours.encode(text).ids == ref.encode(text).ids


def test_unsupported_architecture_and_quantization_are_named(bpe, tmp_path):
    from engine.errors import ModelError
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    store = ModelStore(PluginHost(safe_mode=True, disabled=[]).load(), user_dir=tmp_path / "models")
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match="architecture 'mamba'.*supported: llama, qwen2, qwen3"):
        store.import_(path)
    path = tmp_path / "iq.gguf"
    write_gguf(_model("llama"), "llama", bpe, path, gguf.GGMLQuantizationType.F16)
    from engine import gguf as ours

    old = ours.QUANT_TYPES
    ours.QUANT_TYPES = ("F32",)  # a file with a type the import does not read is refused by the type's name
    try:
        with pytest.raises(ModelError, match="as F16, a quantization type the import does not read"):
            store.import_(path)
    finally:
        ours.QUANT_TYPES = old


VOCAB_DIRS = [p for p in (Path(__file__).parent / "data" / "ggml-vocab", Path(os.environ.get("STUDIO_GGML_VOCAB_DIR", "")))
              if str(p) not in ("", ".")]


def _vocab_file(name):
    for d in VOCAB_DIRS:
        if (d / f"ggml-vocab-{name}.gguf").is_file():
            return d / f"ggml-vocab-{name}.gguf"
    pytest.skip(f"ggml-vocab-{name}.gguf is not here (see tests/data/ggml-vocab/README.md)")


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2", "qwen2", "llama-bpe"])
def test_llama_cpp_vocabularies_give_llama_cpp_ids(name):
    """Real GGUF vocabularies: the rebuilt tokenizer.json gives llama.cpp's own expected ids for its test texts."""
    from engine.gguf import _fields, read_gguf, tokenizer_from_metadata

    path = _vocab_file(name)
    tok = tokenizer_from_metadata(_fields(read_gguf(path)), path)
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wants = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    pairs = list(zip(texts, wants))
    assert len(pairs) > 40
    for text, want in pairs:
        assert tok.encode(text, add_special_tokens=False).ids == [int(x) for x in want.split()], text


def test_a_vocabulary_only_gguf_says_it_holds_no_weights(tmp_path, studio_home):
    """llama.cpp's ggml-vocab-*.gguf files were refused as 'Model folder ...: the weight model.embed_tokens.weight
    (and 289 more) is missing; the weights do not belong to this config'."""
    from engine.errors import ModelError
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    path = _vocab_file("llama-spm")
    with pytest.raises(ModelError, match=r"^ggml-vocab-llama-spm.gguf holds no weights \(a vocabulary-only GGUF\)"):
        ModelStore(PluginHost().load()).import_(path)
    models = studio_home / "models"
    assert not models.exists() or not any(models.iterdir())  # nothing half-imported is left
