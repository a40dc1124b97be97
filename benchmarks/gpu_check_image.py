"""GPU check, image part: CUDA fp16 vs CPU fp32 for the built-in text-to-image model, and images/s.

    .venv/bin/python benchmarks/gpu_check_image.py [--n 64] [--cpu-dry-run]

Prints: max |U-Net output difference| CUDA fp16 vs CPU fp32 on fixed inputs (relative to the output range),
the analyzer's all-five share for --n captions drawn on CUDA (DPM-Solver++ 20 steps), and images/s batched.
Exits 0 with a message when no GPU is present; ``--cpu-dry-run`` runs the same code on the CPU in bfloat16.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUILTIN = ROOT / "resources" / "models" / "shapes-diffusion"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--cpu-dry-run", action="store_true")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from plugins.image import model as M
    from engine.diffusion import TorchArrays
    from plugins.image.pipeline import ImageNets, SampleSettings, TorchDenoiser, TorchTextEncoder, coord_maps, sample
    from plugins.image.train import score_images
    from engine.shapes import caption, sample_scene

    if args.cpu_dry_run:
        device, dtype, sync = "cpu", torch.bfloat16, (lambda: None)
    elif torch.cuda.is_available():
        device, dtype, sync = "cuda", torch.float16, torch.cuda.synchronize
    else:
        print("no CUDA device: nothing to check (use --cpu-dry-run to test the script)")
        return 0
    ref = M.load(BUILTIN, "cpu")
    dev = M.load(BUILTIN, "cpu")
    dev.unet.to(device=device, dtype=dtype), dev.text_encoder.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    S, C = ref.cfg.sample_size, ref.cfg.coord_channels
    x = torch.cat([torch.randn(4, 3, S, S), torch.from_numpy(coord_maps(S, C)).expand(4, -1, -1, -1)], 1)
    ids = torch.tensor([ref.prompt_encoder.encode(caption(sample_scene(np.random.default_rng(i)))).ids
                        for i in range(4)])
    t = torch.tensor([999.0, 700.0, 300.0, 20.0])
    with torch.inference_mode():
        h, pooled = ref.text_encoder(ids)
        want = ref.unet(x, t, h, h.mean(1) if ref.cfg.class_labels == "mean" else pooled)
        hd, pd = dev.text_encoder(ids.to(device))
        got = dev.unet(x.to(device, dtype), t.to(device), hd, hd.mean(1) if ref.cfg.class_labels == "mean" else pd)
    diff = (got.float().cpu() - want).abs().max().item()
    print(f"U-Net {device} {dtype} vs CPU fp32: max |diff| {diff:.3g} ({diff / (want.max() - want.min()).item():.2e} "
          "of the output range; class vector: the same plain mean over all 16 positions on both sides)")
    caps = [caption(sample_scene(np.random.default_rng(i))) for i in range(args.n)]
    enc = dev.prompt_encoder
    text, den = TorchTextEncoder(dev.text_encoder, device, dtype), TorchDenoiser(dev.unet, device, dtype)
    nets = ImageNets(TorchArrays(), text, den, S, C, dev.cfg.class_labels, dev.cfg.scheduler, enc)
    run = lambda: sample(nets, [enc.encode(c).ids for c in caps], [enc.encode("").ids] * len(caps),
                         SampleSettings(20, 1.5, "dpmpp_2m"), 0)
    run()
    sync()
    t0 = time.perf_counter()
    imgs = run()
    sync()
    dt = time.perf_counter() - t0
    s = score_images(imgs, caps)
    print(f"{args.n} images on {device}: all five {s['all_five']:.3f}, {args.n / dt:.1f} images/s (batched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
