"""The star demonstration (issue #18): teach the built-in shapes diffusion model a shape it has never seen.

Renders 32 captioned star scenes (docs/shapes_spec.md, extension), fine-tunes a LoRA with `studio finetune image`,
then draws every prompt of a fixed set of star prompts and of original prompts with the base model and with the
adapter, and reads them back with the analyzer that knows stars:

    .venv/bin/python benchmarks/finetune_star.py [--steps 400] [--n 60] [--work runs/star]

Printed: the share of star prompts read back with all five attributes right (and the kind alone), before and
after; the same for original (circle, square, triangle) prompts, to see what the adapter made the model forget;
and the training time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def star_scenes(n: int, seed: int):
    from engine import shapes as S

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = S.sample_scene(rng)
        out.append(S.Scene(base.size, base.colour, "star", base.position, base.background))
    return out


def score(images, scenes):
    from engine import shapes as S

    got = [S.analyze(im, kinds=S.ALL_KINDS) for im in images]
    return {"all_five": round(sum(g == s for g, s in zip(got, scenes)) / len(scenes), 3),
            "kind": round(sum(g is not None and g.kind == s.kind for g, s in zip(got, scenes)) / len(scenes), 3)}


def draw(scenes, lora, seed=7):
    import torch

    from engine.diffusion import SampleSettings
    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from engine.shapes import caption
    from plugins.image import model as M
    from plugins.image.pipeline import generate_images, torch_nets

    loaded = M.load(ROOT / "resources" / "models" / "shapes-diffusion")
    if lora:
        apply_adapters({"unet": loaded.unet, "text_encoder": loaded.text_encoder},
                       [AdapterRef("star", Path(lora), "", 1.0)])
    with torch.inference_mode():
        return generate_images(torch_nets(loaded), [caption(s) for s in scenes], SampleSettings(20, 1.5, "dpmpp_2m"),
                               seed)


def finetune(kind: str, model: str, work: Path, data: Path, threads: int, flags: list):
    """Run `studio finetune KIND` in a fresh STUDIO_HOME under ``work`` (resuming a run left there): (seconds,
    logged steps, adapter path), or None after printing its error."""
    env = dict(os.environ, STUDIO_HOME=str(work / "home"), STUDIO_PLUGIN_CHECK="0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "finetune", kind, "--model", model, "--data",
                           str(data), "--out", str(work / "run"), "--threads", str(threads), "--json"] + flags
                          + (["--resume"] if (work / "run" / "checkpoint").exists() else []),
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr)
        return None
    log = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"step"')]
    return seconds, log, json.loads(proc.stdout.splitlines()[-1])["adapter"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--n", type=int, default=60, help="prompts of each kind to score")
    p.add_argument("--work", default="runs/star")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also adapt the text encoder (--no-text-encoder: the U-Net only)")
    p.add_argument("--prior", type=int, default=0, help="render this many original scenes as prior-preservation "
                                                         "images mixed into the batches (0: none)")
    p.add_argument("--prior-share", type=float, default=0.5)
    a = p.parse_args(argv)
    import torch

    from engine import shapes as S
    from PIL import Image

    torch.set_num_threads(a.threads)
    work = Path(a.work).absolute()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(star_scenes(32, seed=1)):
        Image.fromarray(S.render(sc, 32, antialias=i % 2 == 1)).save(data / f"star{i:02d}.png")
        (data / f"star{i:02d}.txt").write_text(S.caption(sc))
    extra = [] if a.text_encoder else ["--no-text-encoder"]
    if a.prior:
        prior = work / "prior"
        prior.mkdir(exist_ok=True)
        rng = np.random.default_rng(3)
        for i in range(a.prior):
            sc = S.sample_scene(rng)
            Image.fromarray(S.render(sc, 32, antialias=i % 2 == 1)).save(prior / f"scene{i:03d}.png")
            (prior / f"scene{i:03d}.txt").write_text(S.caption(sc))
        extra += ["--prior-data", str(prior), "--prior-share", str(a.prior_share)]
    result = finetune("image", "shapes-diffusion", work, data, a.threads, ["--steps", str(a.steps), "--batch",
                      str(a.batch), "--lr", str(a.lr), "--eval-every", "50", "--checkpoint-every", "25"] + extra)
    if result is None:
        return 1
    train_s, log, adapter = result
    stars = star_scenes(a.n, seed=1000)  # prompts never in the training set's seeds
    rng = np.random.default_rng(2000)
    originals = [S.sample_scene(rng) for _ in range(a.n)]
    rows = {}
    for name, lora in (("base", None), ("with the star LoRA", adapter)):
        rows[name] = {"star prompts": score(draw(stars, lora), stars),
                      "original prompts": score(draw(originals, lora), originals)}
    print(json.dumps({"train_seconds": round(train_s, 1), "steps": a.steps, "threads": a.threads,
                      "text_encoder": a.text_encoder, "prior_images": a.prior, "prior_share": a.prior_share,
                      "loss_first": log[0]["loss"] if log else None, "loss_last": log[-1]["loss"] if log else None,
                      "val_curve": [(e["step"], e["val_loss"]) for e in log if "val_loss" in e],
                      "scores": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
