"""The caption star demonstration (issue #18): teach the built-in shapes captioner a shape it has never seen.

Renders 32 captioned star scenes (docs/shapes_spec.md, extension; the captioner's training augmentations: a shift
of up to 0.04 S, 10 % size change, anti-aliasing on half), and --prior original scenes as prior-preservation
images, fine-tunes a LoRA with `studio finetune caption` (the word "star" becomes a new token), then captions fresh
star scenes and fresh original scenes with the base model and with the adapter, through the caption generator:

    .venv/bin/python benchmarks/finetune_caption_star.py [--steps 300] [--n 200] [--work runs/caption-star]

Printed (JSON): exact-caption rate and the kind-word rate on star scenes, before and after; the exact rate on
original scenes (what the adapter made the captioner forget); the misses by true and read size and kind; the loss
curve and the training time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "resources" / "models" / "shapes-captioner"
from finetune_star import finetune  # noqa: E402 - beside this script


def scenes(n: int, seed: int, star: bool):
    from engine import shapes as S

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sc = S.sample_scene(rng)
        if star:
            sc = S.Scene(sc.size, sc.colour, S.STAR, sc.position, sc.background)
        shift = tuple(rng.uniform(-0.04 * 32, 0.04 * 32, size=2))
        out.append((sc, S.render(sc, 32, antialias=bool(rng.integers(2)), shift=shift,
                                 scale=float(rng.uniform(0.9, 1.1)))))
    return out


def write_folder(folder: Path, items, stem: str) -> Path:
    from PIL import Image

    from engine.shapes import caption

    folder.mkdir(parents=True, exist_ok=True)
    for i, (sc, image) in enumerate(items):
        Image.fromarray(image).save(folder / f"{stem}{i:03d}.png")
        (folder / f"{stem}{i:03d}.txt").write_text(caption(sc))
    return folder


def caption_all(items, adapter=None) -> list:
    """Greedy captions through the caption generator's pipeline (the adapter loaded as `--lora` loads it)."""
    from PIL import Image

    from engine.generators import AdapterRef
    from plugins.caption.pipeline import CaptionPipeline

    refs = [AdapterRef("star", Path(adapter), "", 1.0)] if adapter else []
    pipe = CaptionPipeline.from_folder(MODEL, adapters=refs)
    pixels = np.concatenate([pipe.pixel_values(Image.fromarray(im)) for _, im in items])
    return [o.text for o in pipe.caption_batch(pixels, 20)]


def score(items, captions) -> dict:
    """Exact and kind rates, and the misses counted as "true size and kind -> the caption's size and kind"."""
    from collections import Counter

    from engine.shapes import caption

    exact = sum(c == caption(sc) for (sc, _), c in zip(items, captions)) / len(items)
    kind = sum(len(c.split()) > 3 and c.split()[3] == sc.kind for (sc, _), c in zip(items, captions)) / len(items)
    misses = Counter(f"{sc.size} {sc.kind} -> {' '.join(c.split()[1:4:2])}" for (sc, _), c in zip(items, captions)
                     if c != caption(sc))
    return {"exact": round(exact, 3), "kind": round(kind, 3), "misses": dict(misses.most_common())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=200, help="scenes of each kind to caption")
    p.add_argument("--prior", type=int, default=256, help="original scenes rendered as prior-preservation images")
    p.add_argument("--work", default="runs/caption-star")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", default="", help="more `studio finetune caption` flags, in one string")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.work).absolute()
    data = write_folder(work / "data", scenes(32, seed=1, star=True), "star")
    extra = a.extra.split()
    if a.prior:
        prior = write_folder(work / "prior", scenes(a.prior, seed=3, star=False), "scene")
        extra += ["--prior-data", str(prior)]
    result = finetune("caption", "shapes-captioner", work, data, a.threads, ["--steps", str(a.steps)] + extra)
    if result is None:
        return 1
    train_s, log, adapter = result
    stars, originals = scenes(a.n, seed=1000, star=True), scenes(a.n, seed=2000, star=False)
    rows = {name: {"star scenes": score(stars, caption_all(stars, lora)),
                   "original scenes": score(originals, caption_all(originals, lora))}
            for name, lora in (("base", None), ("with the star LoRA", adapter))}
    print(json.dumps({"train_seconds": round(train_s, 1), "steps": a.steps, "threads": a.threads,
                      "prior_images": a.prior, "extra": a.extra,
                      "loss_first": log[0]["loss"] if log else None, "loss_last": log[-1]["loss"] if log else None,
                      "val_curve": [(e["step"], e["val_loss"]) for e in log if "val_loss" in e],
                      "seconds_per_step": log[-1]["seconds_per_step"] if log else None,
                      "scores": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
