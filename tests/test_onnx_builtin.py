"""Quality check on the shipped models: an ONNX export of each gives the same greedy text and captions as torch.

Exports go to a temporary --out folder; a model that is not (yet) in resources/models is skipped.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.plugins import PluginHost
from engine.store import ModelStore


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    host = PluginHost(safe_mode=True, disabled=[]).load()
    return host, ModelStore(host, user_dir=tmp_path_factory.mktemp("no-user-models"))


def _builtin(store, generator):
    host, st = store
    for e in st.list():
        if e.builtin and e.generator == generator:
            return e
    pytest.skip(f"no built-in {generator} model yet")


def test_builtin_text_greedy_identical(store, tmp_path, monkeypatch):
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import Export
    from engine.onnx_export import export_model
    from plugins.text.models import load_tokenizer
    from plugins.text.pipeline import TextPipeline, TextRequest, TorchDecoder
    from plugins.text.sampling import SamplingOptions
    from plugins.text.onnx import load_torch_model

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    torch.set_num_threads(1)
    entry = _builtin(store, "text")
    manifest = export_model(store[0], entry, out_dir=tmp_path / "onnx")
    export = Export(tmp_path / "onnx", threads=1)
    tok = load_tokenizer(entry.path)
    bos = entry.config.get("bos_token_id")
    pipes = [TextPipeline(dec, tok, bos_token_id=bos, eos_token_ids=[entry.config.get("eos_token_id")],
                          add_bos=entry.family == "llama")
             for dec in (TorchDecoder(load_torch_model(entry.path, entry.family)),
                         OnnxDecoder(export.session("decoder"), manifest["config"]))]
    req = TextRequest(max_new_tokens=60, sampling=SamplingOptions(temperature=0.0))
    for prompt in ("ROMEO:\nBut soft, what light", "To be, or not to be"):
        a, b = ([e for e in p.run(prompt, req)][-1] for p in pipes)
        assert a.token_ids == b.token_ids and a.text == b.text


def test_builtin_caption_greedy_identical(store, tmp_path, monkeypatch):
    from PIL import Image

    from plugins.caption.pipeline import CaptionPipeline
    from engine.onnx_export import export_model
    from engine.shapes import caption, render, sample_scene

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    torch.set_num_threads(1)
    entry = _builtin(store, "caption")
    export_model(store[0], entry, out_dir=tmp_path / "onnx")
    onnx_pipe = CaptionPipeline.from_export(entry.path, tmp_path / "onnx", threads=1)
    torch_pipe = CaptionPipeline.from_folder(entry.path, backend="torch")
    rng = np.random.default_rng(21)
    right = 0
    for i in range(12):
        scene = sample_scene(rng)
        image = Image.fromarray(render(scene, 32, antialias=bool(i % 2)))
        a, b = torch_pipe(image), onnx_pipe(image)
        assert a.token_ids == b.token_ids
        right += b.text == caption(scene)
    assert right >= 6  # the shipped captioner reads most scenes right on the ONNX backend too


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm"])  # ddpm draws fresh noise at every step
def test_builtin_image_same_seed_same_picture(store, tmp_path, monkeypatch, sampler):
    from plugins.image import model as M
    from plugins.image.onnx import export_nets
    from plugins.image.pipeline import run, torch_nets
    from engine.backends.runtime import Export
    from engine.onnx_export import export_model
    from engine.shapes import analyze

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    torch.set_num_threads(1)
    entry = _builtin(store, "image")
    export_model(store[0], entry, out_dir=tmp_path / "onnx")
    onnx_nets = export_nets(Export(tmp_path / "onnx", threads=1), entry.path)
    loaded = torch_nets(M.load(entry.path))

    options = {"steps": 12, "guidance": 1.5, "sampler": sampler, "negative_prompt": ""}
    for seed, prompt in ((5, "a small red circle at the top left on a black background"),
                         (2**33 + 1, "a large yellow triangle in the center on a purple background")):
        a, b = ([e for e in run(nets, prompt, options, seed)][-1].image for nets in (loaded, onnx_nets))
        a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
        assert np.abs(a - b).max() <= 2 and analyze(a.astype(np.uint8)) == analyze(b.astype(np.uint8))
