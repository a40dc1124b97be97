"""Issue #20 (load time, backend auto): cheap file checks, the saved optimized graph, mapped weights, `auto`."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from engine import filecheck
from engine.backends import optimized
from engine.backends.runtime import Export, choose_export, gate_passed, open_export
from engine.errors import ModelError

EXPORT_FAMILY = "llama"


def _count_hashes(monkeypatch) -> list:
    seen = []
    real = filecheck.sha256_file

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(filecheck, "sha256_file", counting)
    filecheck._HASHES.clear()
    return seen


def _run(session):
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    given = {"input_ids": ids, "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.arange(3, dtype=np.int64)[None]}
    feeds = {i.name: given.get(i.name, None) if i.name in given else np.zeros((1, i.shape[1], 0, i.shape[3]),
                                                                               np.float32)
             for i in session.get_inputs()}
    return session.run(["logits"], feeds)[0]


def test_export_keeps_weights_beside_the_graph_and_stamps_them(exported_tiny):
    folder = exported_tiny / "onnx"
    manifest = json.loads((folder / "onnx.json").read_text())
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(manifest["files"])
    for name, meta in manifest["files"].items():
        st = (folder / name).stat()
        assert meta["bytes"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns and len(meta["sha256"]) == 64
    import onnx
    from onnx import external_data_helper as edh

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) * 4 >= 4096]
    assert big and all(edh.uses_external_data(t) for t in big)
    offsets = [int(e.value) for t in big for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets)  # page-aligned, so onnxruntime can map them


def test_unchanged_files_are_not_hashed(copy, monkeypatch):
    seen = _count_hashes(monkeypatch)
    export = Export(copy / "onnx")
    assert seen == [] and export.notes == []


def test_touched_file_is_hashed_with_a_note(copy, monkeypatch):
    data = copy / "onnx" / "model.onnx.data"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 5_000_000_000))
    seen = _count_hashes(monkeypatch)
    export = Export(copy / "onnx")
    assert seen == ["model.onnx.data"]
    assert any("model.onnx.data" in n and "sha256 was checked and matches" in n for n in export.notes)


def test_changed_file_of_the_same_size_is_refused(copy):
    data = copy / "onnx" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="sha256"):
        Export(copy / "onnx")


def test_changed_size_is_refused_without_hashing(copy, monkeypatch):
    with open(copy / "onnx" / "model.onnx.data", "ab") as f:
        f.write(b"\0")
    seen = _count_hashes(monkeypatch)
    with pytest.raises(ModelError, match="bytes"):
        Export(copy / "onnx")
    assert seen == []


def test_optimized_graph_saved_once_and_reused(copy, monkeypatch):
    first = Export(copy / "onnx")
    expected = _run(first.session("decoder"))
    cache = copy / "onnx" / optimized.FOLDER
    assert (cache / "model.onnx").is_file() and (cache / "model.onnx.json").is_file()
    meta = json.loads((cache / "model.onnx.json").read_text())
    import onnxruntime

    assert meta["onnxruntime"] == onnxruntime.__version__
    stamp = (cache / "model.onnx").stat().st_mtime_ns

    def no_check(*a, **k):
        raise AssertionError("the source graph was parsed and checked again")

    monkeypatch.setattr(optimized, "check_graph", no_check)
    second = Export(copy / "onnx")
    np.testing.assert_allclose(_run(second.session("decoder")), expected, atol=1e-5)
    assert second.notes == [] and (cache / "model.onnx").stat().st_mtime_ns == stamp


def test_optimized_graph_of_another_onnxruntime_is_rebuilt(copy):
    expected = _run(Export(copy / "onnx").session("decoder"))
    meta_path = copy / "onnx" / optimized.FOLDER / "model.onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["onnxruntime"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    export = Export(copy / "onnx")
    np.testing.assert_allclose(_run(export.session("decoder")), expected, atol=1e-5)
    assert any("onnxruntime 0.0.1" in n and "rebuilt" in n for n in export.notes)
    assert json.loads(meta_path.read_text())["onnxruntime"] != "0.0.1"


def test_damaged_optimized_graph_is_rebuilt(copy):
    expected = _run(Export(copy / "onnx").session("decoder"))
    opt = copy / "onnx" / optimized.FOLDER / "model.onnx"
    opt.write_bytes(b"garbage")
    export = Export(copy / "onnx")
    np.testing.assert_allclose(_run(export.session("decoder")), expected, atol=1e-5)
    assert any("changed on disk" in n for n in export.notes)


def test_disk_too_small_still_opens_with_a_note(copy, monkeypatch):
    monkeypatch.setattr(optimized, "room_for", lambda folder, nbytes: False)
    export = Export(copy / "onnx")
    assert _run(export.session("decoder")).shape[-1] > 0
    assert any("could not be saved" in n and "slower" in n for n in export.notes)
    assert not (copy / "onnx" / optimized.FOLDER / "model.onnx.json").exists()


def test_torch_load_maps_weights_without_initialising(exported_tiny, monkeypatch):
    import torch

    from plugins.text.models import load_model

    def refuse(*a, **k):
        raise AssertionError("a weight initialiser ran")

    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", refuse)
    model = load_model(exported_tiny, "llama")
    from safetensors.torch import load_file

    ref = load_file(str(exported_tiny / "model.safetensors"))
    for name, p in model.state_dict().items():
        if name in ref:
            assert torch.equal(p, ref[name].float()), name
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gate_and_choice_of_export(copy):
    manifest = json.loads((copy / "onnx" / "onnx.json").read_text())
    assert gate_passed(manifest)
    assert not gate_passed({**manifest, "forced": True})
    assert not gate_passed({**manifest, "quantization": {"bits": 8, "gate": "the parity gate ran on fp32 only"}})
    gated = {**manifest, "quantization": {"bits": 8},
             "parity": {**manifest["parity"], "decoder_logits_int8": {"passed": True}}}
    assert gate_passed(gated)
    assert not gate_passed({**gated, "parity": {**gated["parity"], "decoder_logits_int8": {"passed": False}}})
    int8 = copy / "onnx-int8"
    shutil.copytree(copy / "onnx", int8)
    (int8 / "onnx.json").write_text(json.dumps(gated))
    assert choose_export(copy) == int8  # the faster variant, having passed its gate
    (int8 / "onnx.json").write_text(json.dumps({**manifest, "quantization": {"bits": 8, "gate": "not gated"}}))
    assert choose_export(copy) == copy / "onnx"
    assert choose_export(copy, legacy=True) == copy / "onnx"
    assert choose_export(copy, gated_only=True, model_hash="another version") is None
    assert open_export(copy, export=int8).folder == int8


def _generate(folder, backend="auto", **kw):
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    host = PluginHost()
    host.load()
    store = ModelStore(host)
    if not any(e.name == folder.name for e in store.list()):  # a store model (replay finds models by name)
        entry = store.import_(folder, name=folder.name)
        if (folder / "onnx").is_dir():
            shutil.copytree(folder / "onnx", entry.path / "onnx")
    job = Job("text", prompt="a b", model=folder.name, backend=backend, device="cpu", seed=5,
              options={"max_new_tokens": 4}, **kw)
    return host, store, execute(prepare(host, store, job), history=False, out_dir=folder.parent / "out")


def test_auto_runs_the_gated_export_on_the_cpu_and_replays_it(copy):
    from engine.replay import replay

    host, store, record = _generate(copy)
    assert record.recipe["backend"] == "onnx" and record.recipe["onnx_export"] == "onnx"
    assert record.recipe["backend_chosen_by"] == "auto"
    again, identical, notes = replay(host, store, record.recipe, history=False, out_dir=copy.parent / "out")
    assert identical and again.recipe["backend"] == "onnx" and again.recipe["onnx_export"] == "onnx"
    assert "backend_chosen_by" not in again.recipe  # the replay ran what the recipe recorded, not auto
    forced = _generate(copy, backend="torch")[2]
    assert forced.recipe["backend"] == "torch" and "onnx_export" not in forced.recipe


def test_auto_without_export_runs_torch(copy):
    shutil.rmtree(copy / "onnx")
    record = _generate(copy)[2]
    assert record.recipe["backend"] == "torch" and record.recipe["backend_chosen_by"] == "auto"


def test_replay_of_a_removed_export_says_so(copy):
    from engine.errors import UsageError
    from engine.replay import replay

    host, store, record = _generate(copy)
    recipe = {**record.recipe, "onnx_export": "onnx-int4"}
    with pytest.raises(UsageError, match="onnx-int4"):
        replay(host, store, recipe, history=False, out_dir=copy.parent / "out")
