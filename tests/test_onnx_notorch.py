"""The ONNX backend runs with torch absent: export here, then generate in a subprocess that blocks ``import torch``."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from engine.onnx_export import export_model
from tests.onnx_fixtures import caption_folder, entry_for, exporter_host, image_folder

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import importlib.abc, json, sys
    from pathlib import Path

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    sys.path.insert(0, sys.argv[1])
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    jobs = json.loads(sys.argv[2])
    builtins = tuple(sorted({j.pop("plugin") for j in jobs}))
    host = PluginHost(safe_mode=True, disabled=[], builtins=builtins).load()
    store = ModelStore(host, builtin_dir=Path(sys.argv[3]) / "none", user_dir=Path(sys.argv[3]))
    results = []
    for job in jobs:
        prep = prepare(host, store, Job(backend="onnx", seed=5, **job))
        rec = execute(prep, out_dir=Path(sys.argv[3]) / "out", history=False)
        image = rec.result.image
        results.append({"text": rec.result.text, "token_ids": rec.result.token_ids,
                        "image": None if image is None else image.tobytes().hex()})
    assert "torch" not in sys.modules
    print(json.dumps(results))
''')


def run_without_torch(jobs: list, models: Path) -> list:
    env = dict(os.environ, STUDIO_ONNX_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), json.dumps(jobs), str(models)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generate_without_torch(tmp_path, monkeypatch):
    from PIL import Image

    from plugins.caption.pipeline import CaptionPipeline
    from engine.shapes import render, sample_scene

    import numpy as np

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)
    host = exporter_host()
    models = tmp_path / "models"
    cap = caption_folder(models / "cap")
    export_model(host, entry_for(cap, "vision-encoder-decoder", "caption"))
    image = tmp_path / "scene.png"
    Image.fromarray(render(sample_scene(np.random.default_rng(2)), 32)).save(image)
    jobs = [{"plugin": "plugins.caption", "generator": "caption", "model": "cap", "image": str(image),
             "options": {"max_new_tokens": 10}},
            {"plugin": "plugins.caption", "generator": "caption", "model": "cap", "image": str(image),
             "options": {"max_new_tokens": 10, "num_beams": 3}}]
    expect = []
    torch_pipe = CaptionPipeline.from_folder(cap, backend="torch")
    expect += [torch_pipe(str(image), 10, 1).token_ids, torch_pipe(str(image), 10, 3).token_ids]
    if importlib.util.find_spec("plugins.text") is not None:
        from tests.test_onnx_text_backend import text_jobs

        extra_jobs, extra_expect = text_jobs(host, models)
        jobs += extra_jobs
        expect += extra_expect
    img = image_folder(models / "img")
    img_entry = entry_for(img, "shapes-diffusion", "image")
    export_model(host, img_entry)
    options = {"steps": 4, "sampler": "dpmpp_2m"}
    jobs.append({"plugin": "plugins.image", "generator": "image", "model": "img", "prompt": "a small red circle",
                 "options": options})
    from plugins.image import INFO
    from plugins.image.onnx import load_image_model
    from plugins.image.pipeline import run

    resolved = INFO.resolve_options(options)  # the host passes every option, defaults included
    events = list(run(load_image_model(img, img_entry.hash), "a small red circle", resolved, 5))
    results = run_without_torch(jobs, models)
    assert [r["token_ids"] for r in results[:len(expect)]] == expect
    assert results[-1]["image"] == events[-1].image.tobytes().hex()
