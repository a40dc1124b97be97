"""The training command on a tiny corpus: writes a loadable model folder and resumes from its checkpoint."""
import json

import pytest
import torch
import transformers

from engine.errors import UsageError
from plugins.text import train
from plugins.text.models import check_folder, load_model

WORDS = "the king and queen of denmark speak with ghosts at night upon the castle walls".split()


def _corpus(folder):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a.txt", "b.txt", "hamlet.txt"):
        idx = torch.randint(0, len(WORDS), (400,), generator=g).tolist()
        (folder / name).write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return folder


def test_train_writes_model_folder_and_resumes(tmp_path):
    data = _corpus(tmp_path / "data")
    out, work = tmp_path / "model", tmp_path / "work"
    argv = ["--data", str(data), "--out", str(out), "--work", str(work), "--holdout", "hamlet.txt",
            "--vocab-size", "300", "--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
            "--ffn", "64", "--context", "32", "--batch", "4", "--steps", "6", "--eval-every", "3", "--warmup", "2"]
    assert train.main(argv) == 0
    check_folder(out, "llama")
    studio = json.loads((out / "studio.json").read_text())
    assert studio["family"] == "llama" and studio["scores"]["heldout_works"] == ["hamlet.txt"]
    assert 0 < studio["scores"]["heldout_bpc"] < 20
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float16"
    # transformers reads the folder and agrees with ours
    ref = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([[0, 5, 7, 9]])
    with torch.no_grad():
        assert (ref(x).logits - load_model(out, "llama")(x, use_cache=False)[0]).abs().max() < 1e-4
    with pytest.raises(UsageError, match="pass --resume to continue it"):  # the same command again would start
        train.main(argv)  # from nothing over the checkpoint of step 6
    # resume continues from step 6 to 8
    assert train.main(argv[:-6] + ["--steps", "8", "--eval-every", "4", "--warmup", "2", "--resume"]) == 0
    state = torch.load(work / "checkpoint.pt", weights_only=False)
    assert state["step"] == 8


def test_a_new_run_never_replaces_a_model_folder(tmp_path, monkeypatch):
    """`studio train text --out FOLDER` over a trained model (or one in the store) replaced it at its first save;
    --out naming a file trained for nothing; --resume with other model flags was torch's list of mismatches."""
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    data = _corpus(tmp_path / "data")
    out = tmp_path / "someone's model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"hours of training")
    argv = ["--data", str(data), "--holdout", "hamlet.txt", "--vocab-size", "300", "--d-model", "32", "--layers", "1",
            "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--context", "32", "--batch", "4", "--steps", "2",
            "--eval-every", "2", "--warmup", "1"]
    for where, words in ((out, "already holds files"), (tmp_path / "home" / "models" / "m", "is in the model store")):
        with pytest.raises(UsageError, match=words):
            train.main(argv + ["--out", str(where), "--work", str(tmp_path / "w1")])
    assert (out / "model.safetensors").read_bytes() == b"hours of training" and not (tmp_path / "w1").exists()
    (tmp_path / "a file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        train.main(argv + ["--out", str(tmp_path / "a file"), "--work", str(tmp_path / "w2")])
    new = ["--out", str(tmp_path / "mine"), "--work", str(tmp_path / "w3")]
    assert train.main(argv + new) == 0
    with pytest.raises(UsageError, match="other model settings"):
        train.main([a if a != "32" else "48" for a in argv] + new + ["--resume", "--steps", "4"])
