"""Quality of the shipped shapes captioner on fresh renders (a seed stream no training run uses)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.shapes import caption, render, sample_scene

MODEL = Path(__file__).resolve().parent.parent / "resources" / "models" / "shapes-captioner"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    from plugins.caption.pipeline import CaptionPipeline

    return CaptionPipeline.from_folder(MODEL)


def test_shipped_folder_is_complete_and_half_precision():
    from plugins.caption import check_folder
    from engine.weights import read_shapes

    check_folder(MODEL)
    assert {dtype for _, dtype in read_shapes(MODEL).values()} == {"F16"}
    studio = json.loads((MODEL / "studio.json").read_text())
    assert studio["generator"] == "caption" and studio["family"] == "vision-encoder-decoder"
    assert "command" in studio["recipe"] and studio["scores"]


@pytest.mark.parametrize("antialias", [False, True])
def test_exact_captions_on_fresh_renders(pipe, antialias):
    rng = np.random.default_rng(np.random.SeedSequence(987_654))
    hits, total = 0, 16
    for _ in range(total):
        scene = sample_scene(rng)
        image = Image.fromarray(render(scene, 32, antialias=antialias))
        hits += pipe(image).text == caption(scene)
    assert hits >= total - 1  # the model scores >= 98 % on 500 renders; allow one miss in 16


def test_any_size_input_and_beam_search(pipe, tmp_path):
    from engine.shapes import Scene

    scene = Scene("large", "yellow", "triangle", "bottom right", "purple")
    path = tmp_path / "big.png"
    Image.fromarray(render(scene, 256, antialias=True)).save(path)
    assert pipe(path).text == caption(scene)
    out = pipe(path, num_beams=4)
    assert out.text == caption(scene) and out.beams[0][0] == out.text


def test_transformers_loads_the_shipped_folder():
    """The shipped folder is a real VisionEncoderDecoderModel checkpoint (only the unused ViT pooler is absent)."""
    from transformers import VisionEncoderDecoderModel

    from plugins.caption.model import load_caption_model

    ref = VisionEncoderDecoderModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    ours = load_caption_model(MODEL)
    torch.manual_seed(0)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 4, 14, 27], [1, 4, 21, 19]])
    with torch.no_grad():
        assert (ref(pixel_values=pixels, decoder_input_ids=ids).logits - ours(pixels, ids)).abs().max() < 1e-4
