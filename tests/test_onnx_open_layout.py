"""The text export folder others open: model.onnx with input_ids / attention_mask / position_ids / past_key_values,
genai_config.json, config.json, generation_config.json, tokenizer files; loaded by onnxruntime-genai and Optimum's
ORTModelForCausalLM, whose greedy tokens must equal the studio's (tiny random models)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.onnx_export import export_model
from tests.decoder_checks import greedy
from tests.onnx_fixtures import entry_for, exporter_host, text_folder

torch.set_num_threads(1)
PROMPT = [3, 5, 7, 11, 13]
NEW = 12
EOS = 1  # tests.onnx_fixtures.text_folder


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_ONNX_THREADS", "1")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory):
    family = request.param
    folder = text_folder(tmp_path_factory.mktemp("open") / f"tiny-{family}", family)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(folder.parent / "home"))
        manifest = export_model(exporter_host(), entry_for(folder, family, "text"))
    return family, folder, manifest


def _studio_greedy(folder, family):
    from plugins.text.onnx import load_torch_model

    model = load_torch_model(folder, family)
    return greedy(model.step, torch.tensor([PROMPT]), NEW, stop=EOS)  # the other runtimes stop after the end


def test_files_and_graph_names(exported):
    family, folder, manifest = exported
    out = folder / "onnx"
    names = {p.name for p in out.iterdir()}
    assert names >= {"model.onnx", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "onnx.json"}
    io = manifest["graphs"]["decoder"]
    assert io["file"] == "model.onnx"
    inputs = {i["name"]: i for i in io["inputs"]}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"]["shape"] == ["batch", "total_sequence"] and inputs["position_ids"]["dtype"] == "int64"
    assert [o["name"] for o in io["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    dec = genai["decoder"]
    assert dec["filename"] == "model.onnx" and dec["num_hidden_layers"] == 2
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    assert genai["type"] == "llama" and genai["vocab_size"] == 64  # genai's decoder loop for both families
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert set(manifest["files"]) >= {"genai_config.json", "config.json", "tokenizer.json"}  # all hashed


def test_left_padded_batch_matches_unpadded(exported):
    """attention_mask and position_ids are honoured: a left-padded row gives the unpadded row's logits."""
    import onnxruntime as ort

    family, folder, manifest = exported
    sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = manifest["config"]

    def run(ids, mask, pos):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(cfg["n_layers"]):
            for t in ("key", "value"):
                feeds[f"past_key_values.{i}.{t}"] = np.zeros((ids.shape[0], cfg["n_kv_heads"], 0, cfg["head_dim"]),
                                                              np.float32)
        return sess.run(None, feeds)

    short = [9, 4, 2]
    ids = np.array([PROMPT, [0, 0] + short], dtype=np.int64)
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]], dtype=np.int64)
    pos = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]], dtype=np.int64)
    batch = run(ids, mask, pos)
    alone = run(np.array([short]), np.ones((1, 3), np.int64), np.array([[0, 1, 2]]))
    assert np.isfinite(batch[0]).all()
    assert np.abs(batch[0][1, 2:] - alone[0][0]).max() < 1e-4
    assert np.abs(batch[0][0] - run(ids[:1], mask[:1], pos[:1])[0][0]).max() < 1e-4


def _genai_greedy(export) -> list:
    """onnxruntime-genai's greedy tokens after PROMPT (at most NEW), from the export folder as it is."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(export))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + NEW)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(PROMPT):]


def test_onnxruntime_genai_generates_the_studio_tokens(exported):
    family, folder, _ = exported
    assert _genai_greedy(folder / "onnx") == _studio_greedy(folder, family)


def test_optimum_ort_model_generates_the_studio_tokens(exported):
    """Runs where Optimum is installed. optimum-onnx 0.1.0 (the release on PyPI) pins transformers < 4.58 and
    huggingface-hub < 1, which the studio's test extra (transformers 5) cannot share, so it is not in the extra;
    docs/onnx.md records the run made with it in a separate environment."""
    ortmod = pytest.importorskip("optimum.onnxruntime")
    family, folder, _ = exported
    model = ortmod.ORTModelForCausalLM.from_pretrained(str(folder / "onnx"), use_cache=True, use_io_binding=False)
    out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                         max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert out[0, len(PROMPT):].tolist() == _studio_greedy(folder, family)


def test_other_runtimes_stop_at_the_end_tokens_of_generation_config(tmp_path):
    """An Instruct model's end-of-turn token is often only in generation_config.json: genai_config.json carried
    config.json's alone, so onnxruntime-genai wrote on past the end where the studio stopped."""
    pytest.importorskip("onnxruntime_genai")
    folder = text_folder(tmp_path / "tiny-instruct", "llama")
    free = _studio_greedy(folder, "llama")
    end = next(t for t in free[2:] if t != EOS)  # a token greedy decoding writes after two others
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, end]}))
    export_model(exporter_host(), entry_for(folder, "llama", "text"))
    assert json.loads((folder / "onnx" / "genai_config.json").read_text())["model"]["eos_token_id"] == [EOS, end]
    got = _genai_greedy(folder / "onnx")
    stop = free.index(end)
    assert got in (free[:stop], free[:stop + 1])  # stopped at the end token (with or without writing it)
