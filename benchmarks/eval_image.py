"""Score the text-to-image model with the shapes analyzer and time its sampling.

    .venv/bin/python benchmarks/eval_image.py [--model resources/models/shapes-diffusion] [--n 200]

Caption i is the scene sampled with seed i. One image per caption with DPM-Solver++ (20 steps) and with
DDPM (1000 steps), both in this run; prints the share of images with all five attributes right, each
attribute's share, and the time per image. Then the cost of one U-Net step and of guidance done as one
batched call versus two separate calls. ``--markdown FILE`` also writes the tables there.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "resources/models/shapes-diffusion"))
    p.add_argument("--n", type=int, default=200, help="captions to score (caption i uses seed i)")
    p.add_argument("--ddpm-n", type=int, default=None, help="captions for DDPM 1000 (default: --n)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's studio.json, else 1.5")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the sampling runs (fp32)")
    p.add_argument("--skip-ddpm", action="store_true")
    p.add_argument("--markdown", default=None)
    p.add_argument("--update-studio", action="store_true", help="write the measured scores into studio.json")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from plugins.image import model as M
    from plugins.image.pipeline import (ImageNets, SampleSettings, TorchDenoiser, TorchTextEncoder, class_vector,
                                        coord_maps, sample)
    from engine.diffusion import TorchArrays
    from plugins.image.train import generate_batch, score_images
    from engine.shapes import caption, sample_scene

    folder = Path(args.model)
    loaded = M.load(folder, "cpu")
    loaded.unet.to(args.device), loaded.text_encoder.to(args.device)
    studio = json.loads((folder / "studio.json").read_text()) if (folder / "studio.json").exists() else {}
    guidance = args.guidance if args.guidance is not None else float(studio.get("sampling", {}).get("guidance", 1.5))
    caps = [caption(sample_scene(np.random.default_rng(i))) for i in range(args.n)]
    enc = loaded.prompt_encoder
    rows = []
    runs = [("dpmpp_2m", 20, caps)]
    if not args.skip_ddpm:
        runs.append(("ddpm", 1000, caps[: args.ddpm_n or args.n]))
    for sampler, steps, cs in runs:
        t0 = time.perf_counter()
        imgs = generate_batch(loaded.unet, loaded.text_encoder, loaded.cfg, cs, steps, sampler, guidance, seed=0,
                              encoder=enc, batch=args.batch, device=args.device)
        dt = (time.perf_counter() - t0) / len(cs)
        s = score_images(imgs, cs)
        rows.append((sampler, steps, len(cs), s, dt))
        print(f"{sampler:9s} {steps:5d} steps n={len(cs)}: all five {s['all_five']:.3f} | size {s['size']:.3f} "
              f"colour {s['colour']:.3f} kind {s['kind']:.3f} position {s['position']:.3f} "
              f"background {s['background']:.3f} | {dt * 1000:.1f} ms/image (batched)", flush=True)

    # latency of one image, and the cost of one U-Net step with batched vs separate guidance passes
    text, den = TorchTextEncoder(loaded.text_encoder, args.device), TorchDenoiser(loaded.unet, args.device)
    S, C = loaded.cfg.sample_size, loaded.cfg.coord_channels
    ids = np.array([enc.encode("").ids, enc.encode(caps[0]).ids])
    hidden, pooled = text(ids)
    pooled = class_vector(hidden, pooled, ids, loaded.cfg.class_labels)
    x2 = torch.cat([torch.randn(2, 3, S, S), torch.from_numpy(coord_maps(S, C)).expand(2, -1, -1, -1)], 1)

    from benchmarks.onnx_vs_torch import median_seconds

    def best_of(fn, reps=30):
        fn()  # warm-up
        return median_seconds(fn, reps)

    one = best_of(lambda: den(x2[:1], 500.0, hidden[1:], pooled[1:]))
    batched = best_of(lambda: den(x2, 500.0, hidden, pooled))
    separate = best_of(lambda: (den(x2[:1], 500.0, hidden[:1], pooled[:1]), den(x2[1:], 500.0, hidden[1:], pooled[1:])))

    nets = ImageNets(TorchArrays(), text, den, S, C, loaded.cfg.class_labels, loaded.cfg.scheduler, enc)

    def image_once(g):
        return sample(nets, [ids[1]], [ids[0]], SampleSettings(20, g, "dpmpp_2m"), 0)
    latency = best_of(lambda: image_once(guidance), reps=10)
    latency_noguide = best_of(lambda: image_once(1.0), reps=10)
    print(f"U-Net step: 1 image {one * 1000:.2f} ms | guidance batched (1 call, batch 2) {batched * 1000:.2f} ms | "
          f"separate (2 calls) {separate * 1000:.2f} ms (x{separate / batched:.2f})")
    print(f"one {S}x{S} image, DPM-Solver++ 20 steps: {latency * 1000:.0f} ms with guidance, "
          f"{latency_noguide * 1000:.0f} ms without")
    if len(rows) == 2:
        (a, b) = rows
        print(f"DPM-Solver++ 20 vs DDPM 1000: all five {a[3]['all_five']:.3f} vs {b[3]['all_five']:.3f}, "
              f"time per image x{b[4] / a[4]:.1f} less")

    if args.update_studio:
        studio.setdefault("scores", {})["eval_image"] = {
            "command": "benchmarks/eval_image.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "guidance": guidance, "captions": "caption i = scene sampled with seed i",
            **{f"{sampler}_{steps}": {"n": n, **{k: round(v, 4) for k, v in s.items()}, "ms_per_image_batched":
                                      round(dt * 1000, 2)} for sampler, steps, n, s, dt in rows},
            "ms_one_image_dpmpp_20": round(latency * 1000, 1)}
        (folder / "studio.json").write_text(json.dumps(studio, indent=2) + "\n")
    if args.markdown:
        lines = [f"Machine: {platform.processor() or platform.machine()}, device {args.device}, torch threads {args.threads}, "
                 f"guidance {guidance}, model `{folder.name}`.", "",
                 "| sampler | steps | n | all five | size | colour | kind | position | background | ms / image (batched) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for sampler, steps, n, s, dt in rows:
            lines.append(f"| {sampler} | {steps} | {n} | {s['all_five']:.3f} | {s['size']:.3f} | {s['colour']:.3f} | "
                         f"{s['kind']:.3f} | {s['position']:.3f} | {s['background']:.3f} | {dt * 1000:.1f} |")
        lines += ["", "| measurement | ms |", "|---|---|",
                  f"| one U-Net step, 1 image | {one * 1000:.2f} |",
                  f"| guidance, cond + uncond batched in one call | {batched * 1000:.2f} |",
                  f"| guidance, two separate calls | {separate * 1000:.2f} |",
                  f"| one image, DPM-Solver++ 20 steps, guided | {latency * 1000:.1f} |",
                  f"| one image, DPM-Solver++ 20 steps, unguided | {latency_noguide * 1000:.1f} |", ""]
        Path(args.markdown).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
