"""Real checkpoint folders: transformers' save_pretrained + tokenizer.json load with the same logits and greedy
tokens; broken folders raise ModelError."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.errors import ModelError
from plugins.text.models import check_folder, load_model, load_tokenizer
from plugins.text.pipeline import TextPipeline, TextRequest, TorchDecoder
from plugins.text.sampling import SamplingOptions

torch.set_num_threads(1)
TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune, café naïve"] * 20


def make_tokenizer(vocab=300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def save_folder(path: Path, family: str, **kw) -> Path:
    torch.manual_seed(0)
    tok = make_tokenizer()
    V = tok.get_vocab_size()
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, **kw)
        model = transformers.GPT2LMHeadModel(cfg)
    model.eval().save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folder(request, tmp_path_factory):
    return request.param, save_folder(tmp_path_factory.mktemp(request.param), request.param)


def _hf(family, path):
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    return cls.from_pretrained(path).eval()


def test_saved_folder_same_logits_and_greedy_tokens(folder):
    family, path = folder
    check_folder(path, family)
    ours = load_model(path, family)
    ref = _hf(family, path)
    tok = load_tokenizer(path)
    pipe = TextPipeline(TorchDecoder(ours), tok, bos_token_id=0, eos_token_ids=[], add_bos=family == "llama")
    ids = pipe.encode_prompt("To be, or not")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ref(x).logits - ours(x, use_cache=False)[0]).abs().max() < 1e-4
        want = ref.generate(x, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(ids):]
    events = list(pipe.run("To be, or not", TextRequest(max_new_tokens=32, sampling=SamplingOptions(temperature=0))))
    assert events[-1].token_ids == want.tolist()
    assert events[-1].info["prompt_tokens"] == len(ids)


def test_untied_llama_folder(tmp_path):
    path = save_folder(tmp_path, "llama", tie_word_embeddings=False)
    check_folder(path, "llama")
    x = torch.tensor([[0, 5, 9, 11]])
    with torch.no_grad():
        assert (_hf("llama", path)(x).logits - load_model(path, "llama")(x, use_cache=False)[0]).abs().max() < 1e-4


def _copy(src: Path, dst: Path, **config) -> Path:
    """A copy of a model folder, with ``config`` changed in its config.json."""
    import shutil

    shutil.copytree(src, dst)
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def test_wrong_shapes(folder, tmp_path):
    family, path = folder
    bad = _copy(path, tmp_path / "bad", **{"hidden_size" if family == "llama" else "n_embd": 64})
    with pytest.raises(ModelError, match="shape"):
        check_folder(bad, family)


def test_missing_keys(folder, tmp_path):
    family, path = folder
    bad = _copy(path, tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    victim = next(k for k in state if "mlp" in k)
    del state[victim]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match=f"the weight {victim} is missing"):
        check_folder(bad, family)
    with pytest.raises(ModelError):
        load_model(bad, family)


def test_unknown_model_type(folder, tmp_path):
    family, path = folder
    bad = _copy(path, tmp_path / "bad", model_type="mamba")
    with pytest.raises(ModelError, match="Unknown model family .mamba.; supported: llama, gpt2, qwen2"):
        check_folder(bad, family)


def test_corrupt_tokenizer_and_weights(folder, tmp_path):
    family, path = folder
    bad = _copy(path, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json"):
        check_folder(bad, family)
    bad2 = _copy(path, tmp_path / "bad2")
    (bad2 / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ModelError, match="corrupt"):
        check_folder(bad2, family)
    (bad2 / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors"):
        check_folder(bad2, family)


def test_sharded_index(tmp_path):
    from engine.weights import load_state_dict

    path = save_folder(tmp_path / "m", "llama")
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[half:]}, str(path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors"
                                            for i, k in enumerate(keys)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "model.safetensors").unlink()
    loaded = load_state_dict(path)
    assert sorted(loaded) == keys and all(torch.equal(loaded[k], state[k]) for k in keys)
    check_folder(path, "llama")
