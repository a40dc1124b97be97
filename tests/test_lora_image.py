"""Image LoRA (issue #18): the studio's kohya file loads in diffusers onto the diffusers twin of the shapes U-Net
with the same output, and `studio finetune image` trains, saves and generates with one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.nn import lora

MODEL = Path(__file__).resolve().parent.parent / "resources" / "models" / "shapes-diffusion"


def test_kohya_unet_lora_loads_in_diffusers_with_the_same_output(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from plugins.image import model as M
    from plugins.image.finetune import UNET_TARGETS

    loaded = M.load(MODEL)
    twin = UNet2DConditionModel.from_config(json.loads((MODEL / "config.json").read_text())["unet"])
    twin.load_state_dict(loaded.unet.state_dict())
    spec = lora.LoraSpec(rank=4, alpha=8, targets=UNET_TARGETS)
    lora.wrap(loaded.unet, spec, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.save_kohya(loaded.unet, tmp_path / "l.safetensors", spec, "unet")
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "l.safetensors"))
    twin.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="studio")
    x, t = torch.randn(2, 5, 32, 32, generator=g), torch.tensor([500.0, 20.0])
    h, c = torch.randn(2, 16, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        ours, theirs = loaded.unet(x, t, h, c), twin(x, t, h, class_labels=c).sample
        twin.disable_lora()
        plain = twin(x, t, h, class_labels=c).sample
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something


def test_finetune_image_trains_saves_and_generates(tmp_path):
    from PIL import Image

    from engine import shapes as S

    data = tmp_path / "stars"
    data.mkdir()
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(6):
        base = S.sample_scene(rng)
        sc = S.Scene(base.size, base.colour, "star", base.position, base.background)
        Image.fromarray(S.render(sc, 32)).save(data / f"s{i}.png")
        (data / f"s{i}.txt").write_text(S.caption(sc))
    Image.fromarray(S.render(sc, 32)).save(data / "uncaptioned.png")
    env = dict(os.environ, STUDIO_HOME=str(tmp_path / "home"), STUDIO_PLUGIN_CHECK="0")

    def studio(*args):
        return subprocess.run([sys.executable, "-m", "studio.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    refused = studio("finetune", "image", "--model", "shapes-diffusion", "--data", str(data))
    assert refused.returncode == 2 and "1 image(s)" in refused.stderr and "no same-named .txt caption" in refused.stderr
    (data / "uncaptioned.png").unlink()
    run = studio("finetune", "image", "--model", "shapes-diffusion", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "3", "--batch", "2", "--eval-every", "3", "--json")
    assert run.returncode == 0, run.stderr
    assert "unknown words (learned as the unknown token): star" in run.stderr
    adapter = json.loads(run.stdout.splitlines()[-1])["adapter"]
    from safetensors import safe_open

    with safe_open(adapter, framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    made = studio("generate", "image", "--prompt", "a large red star in the center on a blue background", "--seed",
                  "3", "--set", "steps=4", "--lora", f"{adapter}:0.5", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["path"].endswith(".png")
    onnx = studio("generate", "image", "--prompt", "a red star", "--backend", "onnx", "--lora", adapter)
    assert onnx.returncode != 0 and "Traceback" not in onnx.stderr


def test_unet_only_with_prior_preservation(tmp_path):
    """--no-text-encoder adapts the U-Net alone; --prior-data mixes captioned images of what the model knows into
    the batches (recorded in the adapter's recipe)."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from engine import shapes as S

    rng = np.random.default_rng(1)
    for folder, kind in (("stars", "star"), ("prior", None)):
        (tmp_path / folder).mkdir()
        for i in range(4):
            sc = S.sample_scene(rng)
            if kind:
                sc = S.Scene(sc.size, sc.colour, kind, sc.position, sc.background)
            Image.fromarray(S.render(sc, 32)).save(tmp_path / folder / f"{i}.png")
            (tmp_path / folder / f"{i}.txt").write_text(S.caption(sc))
    env = dict(os.environ, STUDIO_HOME=str(tmp_path / "home"), STUDIO_PLUGIN_CHECK="0")
    run = subprocess.run([sys.executable, "-m", "studio.cli", "finetune", "image", "--model", "shapes-diffusion",
                          "--data", str(tmp_path / "stars"), "--prior-data", str(tmp_path / "prior"),
                          "--no-text-encoder", "--out", str(tmp_path / "run"), "--steps", "2", "--batch", "4",
                          "--eval-every", "2", "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    adapter = Path(json.loads(run.stdout.splitlines()[-1])["adapter"])
    with safe_open(str(adapter), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    recipe = json.loads((adapter.parent / "studio_adapter.json").read_text())["recipe"]
    assert recipe["data"]["prior_images"] == 4 and recipe["data"]["text_encoder"] is False
