import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.errors import ModelError, UsageError
from engine.plugins import PluginHost
from engine.store import ModelStore, content_hash
from plugin_samples import drop

TOY = '''
from engine import hookimpl
from engine.architectures import Architecture
from engine.errors import ModelError

def check(folder):
    import json
    from safetensors.numpy import load_file
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    if w["weight"].shape != (cfg["size"],):
        raise ModelError(f"weight has shape {w['weight'].shape}, config says ({cfg['size']},)")

@hookimpl
def register_architectures(register):
    register(Architecture(family="toy", generator="upper", matches=lambda c: c.get("model_type") == "toy",
                          check=check, needs_tokenizer=True))
'''


@pytest.fixture
def store(studio_home, tmp_path):
    drop(studio_home, "toy", TOY)
    host = PluginHost(builtins=()).load()
    return ModelStore(host, builtin_dir=tmp_path / "no-builtins")


def make_folder(path, size=4, weight_size=None, tokenizer=True, model_type="toy"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "size": size}))
    save_file({"weight": np.ones(weight_size or size, dtype=np.float32)}, str(path / "model.safetensors"))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def test_import_list_info_remove(store, tmp_path):
    src = make_folder(tmp_path / "m1")
    entry = store.import_(src, name="mine")
    assert entry.family == "toy" and entry.generator == "upper" and not entry.builtin
    assert entry.hash == content_hash(src)
    assert [e.name for e in store.list()] == ["mine"]
    assert store.default_for("upper").name == "mine"
    with pytest.raises(UsageError, match="already exists"):
        store.import_(src, name="mine")
    store.remove("mine")
    assert store.list() == []


def test_a_damaged_model_can_be_removed_and_imported_again(store, tmp_path, monkeypatch):
    """A store folder with a broken config.json was skipped by the list, so `models remove` said it was not in
    the store and `models import` that the name was taken: it could only be deleted by hand."""
    src = make_folder(tmp_path / "m1")
    entry = store.import_(src, name="m1")
    (entry.path / "config.json").write_text("{")
    assert store.list() == []
    store.remove("m1")
    assert not entry.path.exists()
    assert store.import_(src, name="m1").name == "m1"
    for name in ("", " ", ".", ".."):
        with pytest.raises((UsageError, ModelError)):
            store.remove(name)
    assert store.user_dir.is_dir() and [e.name for e in store.list()] == ["m1"]
    monkeypatch.chdir(src)
    store.remove("m1")
    assert store.import_(Path(".")).name == "m1"  # `studio models import .` is named after the folder
    (tmp_path / "linked").symlink_to(src)
    assert store.import_(tmp_path / "linked").name == "linked"  # a link by its own name (was its target's)


@pytest.mark.parametrize("breakage,message", [
    ("no_config", "no config.json"),
    ("no_weights", "has no weights"),
    ("truncated", "corrupt or truncated"),
    ("garbage", "corrupt or truncated"),
    ("unknown_family", "unknown model family"),
    ("no_tokenizer", "no tokenizer.json"),
    ("wrong_shape", "weight has shape"),
    ("pickle", "pass --trust"),
])
def test_bad_folders_are_refused_and_nothing_is_imported(store, tmp_path, breakage, message):
    src = make_folder(tmp_path / "bad", weight_size=5 if breakage == "wrong_shape" else None,
                      tokenizer=breakage != "no_tokenizer",
                      model_type="mystery" if breakage == "unknown_family" else "toy")
    weights = src / "model.safetensors"
    if breakage == "no_config":
        (src / "config.json").unlink()
    elif breakage in ("no_weights", "pickle"):
        weights.unlink()
        if breakage == "pickle":
            (src / "pytorch_model.bin").write_bytes(b"\x80\x04fake pickle")
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-3])
    elif breakage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match=message):
        store.import_(src)
    assert store.list() == []
    assert not any(p.name.startswith(".") for p in store.user_dir.glob("*")) if store.user_dir.exists() else True


def test_trusted_pickle_is_converted_to_safetensors(store, tmp_path):
    import torch

    src = make_folder(tmp_path / "pk")
    (src / "model.safetensors").unlink()
    torch.save({"weight": torch.ones(4)}, src / "pytorch_model.bin")
    entry = store.import_(src, name="pk", trust=True)
    assert (entry.path / "model.safetensors").exists()
    assert not (entry.path / "pytorch_model.bin").exists()


def test_bad_names_and_unknown_models(store, tmp_path):
    src = make_folder(tmp_path / "m")
    with pytest.raises(UsageError, match="letters, digits"):
        store.import_(src, name="../evil")
    with pytest.raises(UsageError, match="Unknown model 'ghost'"):
        store.get("ghost")
    # what must be converted by `models import` first is named so, not "has no config.json" / "Unknown model"
    (tmp_path / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "sd-pipeline").mkdir()
    (tmp_path / "sd-pipeline" / "model_index.json").write_text("{}")
    full = ModelStore(PluginHost().load(), builtin_dir=tmp_path / "no-builtins")  # with the SD importer
    for path in (tmp_path / "tiny.Q8_0.gguf", tmp_path / "sd-pipeline"):
        with pytest.raises(UsageError, match="run `studio models import .*` once, then give its name"):
            full.get(str(path))


def test_sharded_weights(store, tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "size": 4}))
    (src / "tokenizer.json").write_text("{}")
    save_file({"a": np.ones(2, np.float32)}, str(src / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(2, np.float32)}, str(src / "model-00002-of-00002.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    store.host.architectures["toy"] = (store.host.architectures["toy"][0].__class__(
        family="toy", generator="upper", matches=lambda c: c.get("model_type") == "toy"), "toy")
    entry = store.import_(src, name="sharded")
    assert entry.size_bytes > 0
    (entry.path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="lacks the weight shard model-00002"):
        store.validate(entry.path)


def test_one_rule_for_which_files_hold_the_weights(tmp_path):
    """A folder with both model.safetensors and a shard index is hashed from the file it is loaded from."""
    from engine.store import content_hash
    from engine.weights import find_weight_files, load_state_dict

    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": np.ones(2, np.float32)}, str(folder / "model.safetensors"))
    save_file({"w": np.zeros(2, np.float32)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00001.safetensors"}}))
    assert [p.name for p in find_weight_files(folder)] == ["model.safetensors"]
    assert float(load_state_dict(folder)["w"].sum()) == 2.0
    before = content_hash(folder)
    save_file({"w": np.full(2, 5, np.float32)}, str(folder / "model-00001-of-00001.safetensors"))
    assert content_hash(folder) == before  # the shard is not what loads, so it is not what is hashed
    save_file({"w": np.full(2, 3, np.float32)}, str(folder / "model.safetensors"))
    assert content_hash(folder) != before


def test_killed_imports_and_foreign_studio_json_do_not_break_the_store(store, tmp_path, monkeypatch):
    """A killed import's half-copied folder was listed as a model and stayed forever; a folder that vanished while
    being listed (another process's import finishing) failed the listing and so every generation; a studio.json
    with a value of the wrong type ("hash": 5) was 'unexpected TypeError' in every listing."""
    import os
    import socket

    here = socket.gethostname()
    user = store.user_dir
    user.mkdir(parents=True, exist_ok=True)
    dead = make_folder(user / f".import-{here}~999999999-abc")  # killed mid-copy
    live = make_folder(user / f".import-{here}~{os.getpid()}-def")  # an import running now
    assert store.list() == []
    store.import_(make_folder(tmp_path / "m1"), name="mine")
    assert not dead.exists() and live.exists() and [e.name for e in store.list()] == ["mine"]

    real = store._entry

    def vanishing(folder, builtin):
        if folder.name == "gone":
            raise FileNotFoundError(2, "No such file or directory", str(folder / "model.safetensors"))
        return real(folder, builtin)

    make_folder(user / "gone")
    monkeypatch.setattr(store, "_entry", vanishing)
    assert [e.name for e in store.list()] == ["mine"]
    monkeypatch.undo()

    src = make_folder(tmp_path / "foreign")
    (src / "studio.json").write_text(json.dumps({"hash": 5, "fingerprint": "x", "scores": "abc", "autov2": {"a": 1},
                                                 "title": "Foreign"}))
    entry = store.import_(src, name="foreign")
    assert entry.title == "Foreign" and len(entry.hash) == 64 and entry.to_dict()["scores"] == {}
    from engine.store import studio_json

    kept = studio_json(user / "foreign")  # what the studio itself writes passes its own check (the fingerprint
    assert isinstance(kept["fingerprint"], dict) and kept["hash"] == entry.hash  # is what spares rehashing)
    (user / "foreign" / "studio.json").write_text(json.dumps({"hash": 5, "fingerprint": "x"}))  # damaged later
    assert sorted(e.name for e in store.list()) == ["foreign", "gone", "mine"]


def test_importing_a_missing_path_is_a_usage_error(store, tmp_path):
    """A path that is not there is the user's slip (exit 2, as a missing --image), not "is not a folder"."""
    with pytest.raises(UsageError, match="does not exist; give the path of a model folder or file"):
        store.import_(tmp_path / "no-such-model")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="is not a folder"):  # there, but no model: still a model error
        store.import_(tmp_path / "notes.txt")
    with pytest.raises(UsageError, match="No path was given"):  # ("" was the current folder)
        store.import_("")
