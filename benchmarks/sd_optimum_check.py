"""Does Optimum open the studio's Stable Diffusion ONNX export as it is, and draw the studio's pictures?

    .venv/bin/python benchmarks/sd_optimum_check.py --optimum-python /path/to/other/venv/bin/python

Optimum's ONNX pipelines (``optimum-onnx``) pin transformers below 4.58, older than the studio's test
dependencies, so they run from a second virtual environment made once with
``python -m venv V && V/bin/pip install torch==2.13.0 optimum-onnx onnxruntime diffusers``. This script builds tiny
random pipelines with diffusers (SD 1.x and a 9-channel inpainting U-Net), imports and exports them with the studio,
draws text to image, img2img and inpainting on the studio's onnxruntime backend, then has
``ORTStableDiffusion{,Img2Img,Inpaint}Pipeline.from_pretrained(export)`` draw the same prompts with the same seed
and DDIM, and prints the largest difference per pixel (0-1 scale) for each.
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SIZE, STEPS, SEED = 32, 4, 7

OPTIMUM = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import (ORTStableDiffusionImg2ImgPipeline, ORTStableDiffusionInpaintPipeline,
                                     ORTStableDiffusionPipeline)
    work, jobs = sys.argv[1], json.loads(sys.argv[2])
    classes = {"txt2img": ORTStableDiffusionPipeline, "img2img": ORTStableDiffusionImg2ImgPipeline,
               "inpaint": ORTStableDiffusionInpaintPipeline}
    for job in jobs:
        pipe = classes[job["mode"]].from_pretrained(job["export"])
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        kw = {}
        if job["mode"] != "txt2img":
            kw["image"] = Image.open(work + "/in.png")
            if job["mode"] == "img2img":
                kw["strength"] = job["strength"]
            else:
                kw["mask_image"] = Image.open(work + "/mask.png")
        if job["mode"] == "txt2img" or job["mode"] == "inpaint":
            kw.update(height=job["size"], width=job["size"])
        out = pipe(job["prompt"], negative_prompt=job["negative"], num_inference_steps=job["steps"],
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(job["seed"]), output_type="np", **kw)
        np.save(f"{work}/optimum-{job['name']}.npy", out.images)
        print(job["name"], "ok", type(pipe).__name__, flush=True)
''')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimum-python", required=True, help="python of a venv with optimum-onnx installed")
    a = p.parse_args()
    from engine.diffusion import SampleSettings
    from engine.onnx_export import export_model
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.stable_diffusion.onnx import load_onnx
    from plugins.stable_diffusion.pipeline import decode, sample
    from sd_fixtures import save_pipeline
    from test_sd_pipeline import scene

    work = Path(tempfile.mkdtemp(prefix="sd-optimum-"))
    atexit.register(shutil.rmtree, work, True)  # the models and exports take gigabytes
    image, mask = scene()
    image.save(work / "in.png")
    mask.save(work / "mask.png")
    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host, builtin_dir=work / "none", user_dir=work / "models")
    jobs, ours = [], {}
    for variant, modes in (("sd1", ("txt2img", "img2img")), ("inpaint", ("inpaint",))):
        save_pipeline(work / f"tiny-{variant}", variant)
        entry = store.import_(work / f"tiny-{variant}")
        export = Path(export_model(host, entry)["folder"])
        nets = load_onnx(entry.path, entry.hash)
        for mode in modes:
            name = f"{variant}-{mode}"
            kw = {} if mode == "txt2img" else {"image": image, "strength": 0.6 if mode == "img2img" else 1.0}
            if mode == "inpaint":
                kw["mask"] = mask
            z = None
            for _, _, z in sample(nets, "a red cat", "a dog", SampleSettings(STEPS, 7.5, "ddim"), SEED, SIZE, SIZE,
                                  **kw):
                pass
            ours[name] = (decode(nets, z).transpose(0, 2, 3, 1) + 1) / 2
            jobs.append({"name": name, "mode": mode, "export": str(export), "prompt": "a red cat",
                         "negative": "a dog", "steps": STEPS, "seed": SEED, "strength": 0.6, "size": SIZE})
    run = subprocess.run([a.optimum_python, "-c", OPTIMUM, str(work), json.dumps(jobs)], capture_output=True,
                         text=True)
    print(run.stdout.strip())
    if run.returncode != 0:
        print(run.stderr[-3000:])
    for job in jobs:
        path = work / f"optimum-{job['name']}.npy"
        if not path.exists():
            print(f"{job['name']}: Optimum produced no image")
            continue
        theirs = np.load(path)
        diff = np.abs(theirs - ours[job["name"]]).max() if theirs.shape == ours[job["name"]].shape else "shape"
        print(f"{job['name']}: Optimum {theirs.shape} vs studio onnx {ours[job['name']].shape}, max |diff| {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
