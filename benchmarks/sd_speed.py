"""Stable Diffusion speed on the CPU: the studio's torch pipeline against diffusers on the same weights and threads.

    .venv/bin/python benchmarks/sd_speed.py [--size 512] [--steps 3] [--threads 2] [--rounds 2] [--small]
                                            [--onnx] [--int8]

Random weights of real SD 1.5 size (U-Net 860M, VAE 84M, CLIP ViT-L text encoder 123M; the configs below are SD
1.5's), built by diffusers and transformers into a temporary folder, imported through the studio's importer. Each
runtime draws one image of --size x --size with --steps DPM++ 2M steps and guidance 7.5; the runs take turns,
--rounds times each, in fresh processes (so each process's peak resident memory is its own). Printed: seconds per
U-Net step (the median step of the run), seconds per image (text encoding, steps and VAE decode), peak RSS.
``--small`` uses a quarter-width model (for a quick check; not the recorded figures). ``--onnx`` also exports
the model (``studio export-onnx``: Optimum's layout, gated) and runs the studio's pipeline on onnxruntime (no
torch imported); ``--int8`` adds the export with int8 U-Net MatMuls. The export's own time and peak memory are
printed too.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu")


def build(folder: Path, small: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_fixtures import clip_vocab

    unet, vae, text = dict(UNET), dict(VAE), dict(TEXT)
    if small:
        unet.update(block_out_channels=(64, 128, 256, 256), cross_attention_dim=192)
        vae.update(block_out_channels=(32, 64, 128, 128))
        text.update(hidden_size=192, intermediate_size=768, num_attention_heads=4)
    torch.manual_seed(0)
    clip_vocab(folder.parent / "tok")
    tok = CLIPTokenizer(str(folder.parent / "tok" / "vocab.json"), str(folder.parent / "tok" / "merges.txt"),
                        model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae), unet=UNet2DConditionModel(**unet),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                  **text)),
        tokenizer=tok, scheduler=DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def child(runtime: str, folder: str, size: int, steps: int, threads: int) -> dict:
    """One image on ``runtime`` (diffusers, studio, onnx or onnx-int8) in this process; times and peak RSS."""
    import contextlib

    step_times = []
    if runtime.startswith("onnx"):  # no torch in this process
        os.environ["STUDIO_ONNX_THREADS"] = str(threads)
        no_grad = contextlib.nullcontext
    else:
        import torch

        torch.set_num_threads(threads)
        no_grad = torch.inference_mode
    t0 = time.perf_counter()
    if runtime == "diffusers":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        last = [time.perf_counter()]
        load_s = last[0] - t0

        def on_step(p, i, t, kw):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            return kw

        t0 = time.perf_counter()
        last[0] = t0
        with torch.inference_mode():
            pipe("a red cat on a blue sofa", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                 generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
        total = time.perf_counter() - t0
        step_times = step_times[1:] or step_times  # the first includes text encoding
    else:
        from engine.diffusion import SampleSettings
        from plugins.stable_diffusion.pipeline import decode, sample

        if runtime.startswith("onnx"):
            from plugins.stable_diffusion.onnx import load_onnx

            sd = load_onnx(Path(folder), export=Path(folder) / runtime)  # opens the sessions txt2img uses
        else:
            from plugins.stable_diffusion.model import load

            sd = load(Path(folder))
        load_s = time.perf_counter() - t0
        t0 = last = time.perf_counter()
        latents = None
        with no_grad():
            for i, n, latents in sample(sd, "a red cat on a blue sofa", "", SampleSettings(steps, 7.5, "dpmpp_2m"), 1,
                                        size, size):
                now = time.perf_counter()
                if i <= n and i > 0 and now - last > 0:
                    step_times.append(now - last)
                last = now
            decode(sd, latents, tiled=size * size > 768 * 768)
        total = time.perf_counter() - t0
        step_times = step_times[1:-1] or step_times
    step_times.sort()
    return {"runtime": runtime, "step_s": step_times[len(step_times) // 2], "image_s": total, "load_s": load_s,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not start from the parent's peak at
    fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export(folder: Path, int8: bool) -> list:
    """``studio export-onnx`` of the imported model (fp32, and int8 with ``int8``) in a fresh process each; the
    export's seconds and peak RSS."""
    out = []
    for scheme in ([None, "int8"] if int8 else [None]):
        code = ("import json, resource, sys, time; sys.path.insert(0, sys.argv[1])\n"
                "from pathlib import Path\nfrom engine.plugins import PluginHost\nfrom engine.store import ModelStore\n"
                "from engine.onnx_export import export_model\n"
                "host = PluginHost(safe_mode=True, disabled=[]).load()\n"
                "store = ModelStore(host, builtin_dir=Path(sys.argv[2]) / 'none', user_dir=Path(sys.argv[2]))\n"
                "entry = store.get(Path(sys.argv[3]).name)\nt0 = time.perf_counter()\n"
                "m = export_model(host, entry, quantize=sys.argv[4] or None)\n"
                "print(json.dumps({'scheme': sys.argv[4] or 'fp32', 'seconds': time.perf_counter() - t0, "
                "'peak_rss_mb': int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024, "
                "'parity': {k: v.get('max_abs_diff') for k, v in m['parity'].items()}}))")
        run = subprocess.run([sys.executable, "-c", code, str(ROOT), str(folder.parent), str(folder), scheme or ""],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"the {scheme or 'fp32'} export failed:\n{run.stderr[-3000:]}")
        out.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--onnx", action="store_true", help="also export to ONNX and run on onnxruntime")
    p.add_argument("--int8", action="store_true", help="also the int8 U-Net export (implies --onnx)")
    p.add_argument("--child", nargs=2, metavar=("RUNTIME", "FOLDER"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.size, a.steps, a.threads)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="sd-speed-"))
    atexit.register(shutil.rmtree, work, True)  # the models and exports take gigabytes
    build(work / "pipe", a.small)
    os.environ.setdefault("STUDIO_HOME", str(work / "home"))
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    host = PluginHost(safe_mode=True, disabled=[]).load()
    studio = ModelStore(host, builtin_dir=work / "none", user_dir=work / "models").import_(work / "pipe").path
    folders = {"diffusers": work / "pipe", "studio": studio}
    runs = {"diffusers": [], "studio": []}
    exports = []
    if a.onnx or a.int8:
        exports = export(studio, a.int8)
        for scheme in (["onnx", "onnx-int8"] if a.int8 else ["onnx"]):
            folders[scheme], runs[scheme] = studio, []
    for _ in range(a.rounds):
        for runtime in runs:
            out = subprocess.run([sys.executable, __file__, "--child", runtime, str(folders[runtime]), "--size",
                                  str(a.size), "--steps", str(a.steps), "--threads", str(a.threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"the {runtime} run failed:\n{out.stderr[-3000:]}")
            runs[runtime].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {'quarter-width' if a.small else 'SD 1.5'}"
          f"-sized random weights, {a.size} x {a.size}, {a.steps} DPM++ 2M steps, guidance 7.5, {a.threads} threads, "
          f"{a.rounds} rounds taking turns, load average {load[0]:.1f} at the end\n")
    print("| runtime | s per U-Net step (best round's median) | s per image (best round) | load s | peak RSS MB |\n"
          "|---|---|---|---|---|")
    for runtime, rs in runs.items():
        best = min(rs, key=lambda r: r["image_s"])
        print(f"| {runtime} | {min(r['step_s'] for r in rs):.2f} | {best['image_s']:.2f} | "
              f"{min(r['load_s'] for r in rs):.1f} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    step = {runtime: min(r["step_s"] for r in rs) for runtime, rs in runs.items()}
    print(f"\nstudio vs diffusers, U-Net step: {step['diffusers'] / step['studio']:.2f}x (above 1: the studio is "
          "faster)")
    for scheme in (s for s in ("onnx", "onnx-int8") if s in step):
        print(f"{scheme} vs studio torch, U-Net step: {step['studio'] / step[scheme]:.2f}x")
    for e in exports:
        print(f"export {e['scheme']}: {e['seconds']:.0f} s, peak RSS {e['peak_rss_mb']:.0f} MB, parity {e['parity']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
