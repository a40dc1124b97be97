"""The text generator on the ONNX backend: same pipeline, same greedy tokens as torch (tiny random models)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.onnx_export import export_model
from tests.onnx_fixtures import entry_for, text_folder

PROMPT = "w3 w5 w7 w11"
GREEDY = {"max_new_tokens": 20, "temperature": 0.0}


def text_jobs(host, models: Path):
    """Export a tiny Llama and GPT-2 into ``models``; (jobs for tests/test_onnx_notorch.py, expected token ids)."""
    from engine.generators import Context
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    jobs, expect = [], []
    for family in ("llama", "gpt2"):
        folder = text_folder(models / f"tiny-{family}", family)
        export_model(host, entry_for(folder, family, "text"))
        jobs.append({"plugin": "plugins.text", "generator": "text", "model": folder.name, "prompt": PROMPT,
                     "options": dict(GREEDY)})
    text_host = PluginHost(safe_mode=True, disabled=[], builtins=("plugins.text",)).load()
    store = ModelStore(text_host, builtin_dir=models / "none", user_dir=models)
    for job in jobs:
        args = {k: v for k, v in job.items() if k != "plugin"}
        rec = execute(prepare(text_host, store, Job(backend="torch", device="cpu", seed=5, **args)), Context(),
                      out_dir=models / "out", history=False)
        expect.append(rec.result.token_ids)
    return jobs, expect


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_ONNX_THREADS", "1")
    torch.set_num_threads(1)
    host = PluginHost(safe_mode=True, disabled=[], builtins=("plugins.text",)).load()
    return host, ModelStore(host, builtin_dir=tmp_path / "none", user_dir=tmp_path / "models")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_onnx_backend_matches_torch(setup, tmp_path, family):
    from engine.runner import Job, execute, prepare

    host, store = setup
    folder = text_folder(tmp_path / "models" / f"t-{family}", family)
    entry = store.get(folder.name)
    export_model(host, entry)
    assert store.get(folder.name).onnx == ["onnx"]
    out = {}
    for backend in ("torch", "onnx"):
        for name, options in (("greedy", GREEDY), ("sampled", {"max_new_tokens": 20, "temperature": 0.9,
                                                               "top_k": 20, "top_p": 0.9})):
            rec = execute(prepare(host, store, Job("text", prompt=PROMPT, model=folder.name, backend=backend,
                                                   seed=3, options=options)), out_dir=tmp_path / "out",
                          history=False)
            out[backend, name] = rec.result.token_ids
    assert out["torch", "greedy"] == out["onnx", "greedy"]
    assert out["torch", "sampled"] == out["onnx", "sampled"]


def test_onnx_backend_slides_past_the_context(setup, tmp_path):
    """More tokens than the model's 96 positions: the pipeline restarts the decoder on a window (past=None)."""
    from engine.runner import Job, execute, prepare

    host, store = setup
    folder = text_folder(tmp_path / "models" / "t-long", "gpt2")
    export_model(host, store.get(folder.name))
    ids = {}
    for backend in ("torch", "onnx"):
        rec = execute(prepare(host, store, Job("text", prompt=PROMPT, model=folder.name, backend=backend, seed=1,
                                               options={"max_new_tokens": 150, "temperature": 0.0})),
                      out_dir=tmp_path / "out", history=False)
        ids[backend] = rec.result.token_ids
    assert len(ids["onnx"]) == 150 and ids["onnx"] == ids["torch"]
