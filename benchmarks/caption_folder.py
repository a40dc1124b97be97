"""Folder captioning speed: images per second of `studio caption-folder`'s engine path (engine.caption_folder) over
rendered shapes scenes, batched vs one image at a time, on torch and on onnxruntime, with the process's resident
memory sampled along the run (flat = no growth per image). Prints a Markdown table.

    python benchmarks/caption_folder.py [--n 1000] [--batch 16] [--threads 2] [--model shapes-captioner]

Each mode captions the same folder from scratch (--overwrite) with history rows recorded, as the CLI does. The
captions of every mode are compared with the one-at-a-time torch captions (they must be identical).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def render_folder(folder: Path, n: int) -> list:
    from PIL import Image

    from engine.shapes import caption, render, sample_scene

    rng = np.random.default_rng(20261203)
    truth = []
    for i in range(n):
        scene = sample_scene(rng)
        Image.fromarray(render(scene, 32, antialias=bool(i % 2))).save(folder / f"scene{i:05d}.png")
        truth.append(caption(scene))
    return truth


def run_mode(host, store, folder: Path, model: str, backend: str, batch: int, history):
    from engine.caption_folder import caption_folder, plan_folder
    from engine.runner import Job

    plan = plan_folder(folder, ".txt", overwrite=True)
    samples = []

    def on_item(item, done, total):
        if done % 100 == 0 or done == total:
            samples.append((done, rss_mb()))

    job = Job("caption", model=model, backend=backend, device="cpu")
    # warm-up: load the model (cached by the context) on 1 batch, so load time is not in the rate
    from engine.generators import Context

    ctx = Context()
    warm = plan_folder(folder, ".txt", overwrite=True)
    warm.todo = warm.todo[:batch]
    caption_folder(host, store, job, warm, batch_size=batch, context=ctx, history=False)
    t0 = time.perf_counter()
    report = caption_folder(host, store, job, plan, batch_size=batch, context=ctx, on_item=on_item, history=history)
    seconds = time.perf_counter() - t0
    captions = {item.image.name: item.caption for item in report.written}
    return len(report.written) / seconds, samples, captions


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="shapes-captioner")
    ap.add_argument("--backends", default="torch,onnx")
    args = ap.parse_args()
    os.environ["STUDIO_TORCH_THREADS"] = os.environ["STUDIO_ONNX_THREADS"] = str(args.threads)
    home = Path(tempfile.mkdtemp(prefix="caption-folder-bench-"))
    os.environ["STUDIO_HOME"] = str(home / "home")
    from engine.history import History
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    host = PluginHost().load()
    store = ModelStore(host)
    folder = home / "scenes"
    folder.mkdir()
    truth = render_folder(folder, args.n)
    backends = args.backends.split(",")
    if "onnx" in backends and not store.get(args.model).onnx:
        from engine.onnx_export import export_model

        export_model(host, store.get(args.model))
    history = History()
    rows, reference = [], None
    for backend in backends:
        for batch in (1, args.batch):
            rate, samples, captions = run_mode(host, store, folder, args.model, backend, batch, history)
            if reference is None:
                reference = captions
            same = sum(captions.get(k) == v for k, v in reference.items())
            exact = sum(captions.get(f"scene{i:05d}.png") == t for i, t in enumerate(truth)) / len(truth)
            growth = samples[-1][1] - samples[0][1] if len(samples) > 1 else 0.0
            rows.append((backend, batch, rate, exact, same, samples[0][1], samples[-1][1], growth))
            print(f"{backend} batch {batch}: {rate:.1f} img/s", file=sys.stderr)
    base = {b: r[2] for r in rows for b in [r[0]] if r[1] == 1}
    print(f"{args.n} rendered 32x32 shapes scenes, model {args.model}, {args.threads} threads, greedy, "
          f"history rows recorded; {os.cpu_count()} cores (shared machine)\n")
    print("| backend | batch | images/s | vs batch 1 | exact match | captions = torch batch 1 | RSS at 100 images (MB) "
          "| RSS at end (MB) | growth (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, batch, rate, exact, same, first, last, growth in rows:
        print(f"| {backend} | {batch} | {rate:.1f} | {rate / base[backend]:.2f}x | {exact:.1%} | {same}/{len(reference)} "
              f"| {first:.0f} | {last:.0f} | {growth:+.1f} |")
    if "torch" in base and "onnx" in base:
        t = max(r[2] for r in rows if r[0] == "torch")
        o = max(r[2] for r in rows if r[0] == "onnx")
        print(f"\nonnxruntime / torch at their best batch: {o / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
