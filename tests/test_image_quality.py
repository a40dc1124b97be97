"""Quality of the shipped shapes-diffusion model, read back by the deterministic analyzer (kept fast)."""
import json
from pathlib import Path

import numpy as np
import torch

from engine.generators import Context, ModelRef, Request, Result

FOLDER = Path(__file__).resolve().parents[1] / "resources/models/shapes-diffusion"
N = 16
MIN_ALL_FIVE = 0.75  # the shipped model scores 0.96 on 200 captions (docs/benchmarks_image.md)


def test_shipped_model_draws_what_it_is_told():
    from plugins.image import model as M
    from plugins.image.train import generate_batch, score_images
    from engine.shapes import caption, sample_scene

    torch.set_num_threads(1)
    M.check_folder(FOLDER)
    loaded = M.load(FOLDER)
    studio = json.loads((FOLDER / "studio.json").read_text())
    guidance = studio.get("sampling", {}).get("guidance", 1.5)
    caps = [caption(sample_scene(np.random.default_rng(1000 + i))) for i in range(N)]
    imgs = generate_batch(loaded.unet, loaded.text_encoder, loaded.cfg, caps, 20, "dpmpp_2m", guidance, seed=0,
                          encoder=loaded.prompt_encoder)
    s = score_images(imgs, caps)
    assert s["all_five"] >= MIN_ALL_FIVE, s
    assert min(s["colour"], s["background"]) >= 0.75, s


def test_shipped_model_through_the_plugin():
    import plugins.image as plugin

    _image_architecture().verify(FOLDER)
    ref = ModelRef(name="shapes-diffusion", path=FOLDER, family="shapes-diffusion", hash="x",
                   config=json.loads((FOLDER / "config.json").read_text()))
    req = Request(prompt="a large red square in the center on a white background",
                  options=plugin.INFO.resolve_options({}), seed=0, model=ref)
    result = list(plugin.generate(req, Context()))[-1]
    assert isinstance(result, Result) and result.image.size == (32, 32) and result.image.mode == "RGB"
    assert result.warnings == []


def _image_architecture():
    """The shapes family's Architecture as the host registers it (its ``verify`` is what the store runs)."""
    from engine.plugins import PluginHost

    return PluginHost(safe_mode=True, disabled=[]).load().architectures["shapes-diffusion"][0]
