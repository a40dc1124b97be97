"""Folders as the Hub ships them (issue #15 item 2): generation_config.json's end tokens stop generation, its
sampling settings become the option defaults, and it counts in the model's hash; a folder with vocab.json +
merges.txt and no tokenizer.json runs with the same token ids as its tokenizer.json."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

TEXT = ("The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ne connaît point. "
        "Über den Wolken muss die Freiheit wohl grenzenlos sein. Быстрая коричневая лиса. 我能吞下玻璃而不伤身体。"
        "ギターを弾く。 한국어 문장입니다. مرحبا بالعالم. 12345 + 67890 = 80235; naïve café résumé!\n\t  tabs ")


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT] * 20, vocab_size=300, min_frequency=1, special_tokens=["<|end|>"])
    tok.save(str(d / "tokenizer.json"))
    tok.save_model(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"0": {"content": "<|end|>", "special": True}}, "eos_token": "<|end|>",
         "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, bpe_files):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("hub") / "tiny"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(bpe_files / name, folder / name)
    return folder


def test_vocab_and_merges_give_the_ids_of_tokenizer_json(bpe_files, tmp_path):
    from tokenizers import Tokenizer

    from engine.tokenizer import load_tokenizer

    folder = tmp_path / "vm"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(bpe_files / name, folder / name)
    ours = load_tokenizer(folder)
    ref = Tokenizer.from_file(str(bpe_files / "tokenizer.json"))
    text = TEXT * 40  # about 10 kB, many scripts
    assert len(text.encode()) > 10_000
    assert ours.encode(text).ids == ref.encode(text).ids
    assert ours.encode("a<|end|>b").ids == ref.encode("a<|end|>b").ids
    assert ours.decode(ref.encode(text).ids) == text


def _run(folder, home, **options):
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host, user_dir=home)
    prep = prepare(host, store, Job(generator="text", model=str(folder), prompt="The quick", seed=1,
                                    options={k: str(v) for k, v in options.items()}))
    return prep, execute(prep, history=False)


def test_generation_config_ends_generation_sets_defaults_and_counts_in_the_hash(qwen, tmp_path):
    from engine.store import content_hash

    folder = tmp_path / "m"
    shutil.copytree(qwen, folder)
    prep, rec = _run(folder, tmp_path, max_new_tokens=24, temperature=0)
    ids = rec.result.info.get("token_ids") or rec.result.token_ids
    assert len(ids) == 24
    before = content_hash(folder)
    stop = ids[5]  # a token greedy decoding writes: as an end token it stops generation there
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [stop], "do_sample": False, "top_k": 7, "top_p": 0.5, "repetition_penalty": 1.0}))
    assert content_hash(folder) != before
    prep, rec = _run(folder, tmp_path, max_new_tokens=24)
    opts = prep.request.options
    assert opts["temperature"] == 0.0 and opts["top_k"] == 7 and opts["top_p"] == 0.5  # the model's defaults
    got = rec.result.info.get("token_ids") or rec.result.token_ids
    assert got == ids[:ids.index(stop)] or got == ids[:ids.index(stop) + 1]
    prep, _ = _run(folder, tmp_path, max_new_tokens=2, top_k=3)
    assert prep.request.options["top_k"] == 3  # what the job sets wins
