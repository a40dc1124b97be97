"""Evaluate a caption model on the captioned-shapes world; prints Markdown tables.

(a) fresh renders (a seed stream never used in training): exact caption match and per-attribute accuracy,
    plain and anti-aliased, at the nominal geometry and with the training augmentations;
(b) round trip: random captions -> image generator (20 DPM-Solver++ steps) -> caption generator: how often the
    caption equals the prompt, next to how often the deterministic analyzer agrees with the prompt;
(c) latency per image on the CPU (1 thread unless --threads): greedy and beam search.

    python benchmarks/eval_caption.py [--model resources/models/shapes-captioner] [--n 500] [--roundtrip 200]
        [--skip-roundtrip] [--markdown docs/benchmarks_caption.md] [--update-studio]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVAL_ENTROPY = 31_337  # (a) and (c); training uses SeedSequence(--seed 0, spawn_key=(step,)), validation 20261126
ROUNDTRIP_ENTROPY = 4_242
ATTRS = ("size", "colour", "kind", "position", "background")


def render_set(n: int, S: int, antialias: bool, augment: bool):
    from engine.shapes import caption, render, sample_scene

    rng = np.random.default_rng(np.random.SeedSequence(EVAL_ENTROPY))
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        shift = tuple(rng.uniform(-0.04 * S, 0.04 * S, size=2))
        scale = float(rng.uniform(0.9, 1.1))
        if not augment:
            shift, scale = (0.0, 0.0), 1.0
        out.append((scene, caption(scene), render(scene, S, antialias=antialias, shift=shift, scale=scale)))
    return out


def score(pairs):
    """pairs: [(true Scene, predicted caption)] -> exact rate and per-attribute accuracy."""
    from engine.shapes import caption, parse_caption

    exact, attrs = 0, dict.fromkeys(ATTRS, 0)
    for scene, text in pairs:
        exact += text == caption(scene)
        try:
            pred = parse_caption(text)
        except ValueError:
            continue
        for a in ATTRS:
            attrs[a] += getattr(pred, a) == getattr(scene, a)
    n = len(pairs)
    return exact / n, {a: v / n for a, v in attrs.items()}


def eval_renders(pipe, n: int, S: int, num_beams: int = 1):
    from PIL import Image

    rows = []
    for augment in (False, True):
        for aa in (False, True):
            data = render_set(n, S, aa, augment)
            preds = [(scene, pipe(Image.fromarray(img), num_beams=num_beams).text) for scene, _, img in data]
            exact, attrs = score(preds)
            rows.append({"augmented": augment, "antialias": aa, "n": n, "exact": exact, **attrs,
                         "errors": [(c, p) for (s, c, _), (_, p) in zip(data, preds) if c != p][:5]})
    return rows


def image_generator(folder: Path):
    """A function prompt, seed -> PIL image, through the image plugin's contract (or the engine pipeline)."""
    from engine.generators import Context, ModelRef, Request, Result

    config = json.loads((folder / "config.json").read_text())
    studio = json.loads((folder / "studio.json").read_text()) if (folder / "studio.json").is_file() else {}
    ref = ModelRef(folder.name, folder, studio.get("family", ""), "eval-" + folder.name, config, studio)
    context = Context()
    try:
        from plugins.image import INFO, generate
    except ImportError:
        INFO = generate = None

    def make(prompt: str, seed: int):
        if generate is not None:
            opts = INFO.resolve_options({k: v for k, v in (("steps", 20), ("sampler", "dpmpp_2m"))
                                         if k in {o.name for o in INFO.options}})
            req = Request(prompt=prompt, options=opts, seed=seed, model=ref)
            events = list(generate(req, context))
        else:
            from plugins.image.model import load
            from plugins.image.pipeline import run

            loaded = context.cache.setdefault("image", load(folder))
            events = list(run(loaded, prompt, {"steps": 20, "sampler": "dpmpp_2m"}, seed))
        return [e for e in events if isinstance(e, Result)][-1].image

    return make


def eval_roundtrip(pipe, image_folder: Path, n: int):
    from engine.shapes import analyze, caption, sample_scene

    make = image_generator(image_folder)
    rng = np.random.default_rng(np.random.SeedSequence(ROUNDTRIP_ENTROPY))
    cap_ok = ana_ok = agree = 0
    cap_pairs, ana_pairs, t0 = [], [], time.perf_counter()
    for i in range(n):
        scene = sample_scene(rng)
        prompt = caption(scene)
        image = make(prompt, seed=i)
        text = pipe(image).text
        read = analyze(np.asarray(image.convert("RGB")))
        read_caption = caption(read) if read is not None else "no shape"
        cap_ok += text == prompt
        ana_ok += read_caption == prompt
        agree += text == read_caption
        cap_pairs.append((scene, text))
        ana_pairs.append((scene, read_caption))
    return {"n": n, "caption_equals_prompt": cap_ok / n, "analyzer_equals_prompt": ana_ok / n,
            "caption_equals_analyzer": agree / n, "caption_attrs": score(cap_pairs)[1],
            "analyzer_attrs": score(ana_pairs)[1], "seconds": time.perf_counter() - t0}


def eval_latency(pipe, S: int, n: int):
    from PIL import Image

    images = [Image.fromarray(img) for _, _, img in render_set(n, S, True, True)]
    out = {}
    for beams in (1, 4):
        for im in images[:5]:
            pipe(im, num_beams=beams)  # warm-up
        times = []
        for im in images:
            t = time.perf_counter()
            pipe(im, num_beams=beams)
            times.append(time.perf_counter() - t)
        times.sort()
        out[beams] = {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * times[int(0.9 * (n - 1))],
                      "mean_ms": 1000 * statistics.fmean(times)}
    return out


def pct(x):
    return f"{100 * x:.1f} %"


def markdown(args, model_info, rows, rows_beam, rt, lat, rt_note) -> str:
    command = "python benchmarks/eval_caption.py " + " ".join(model_info["argv"])
    lines = [f"## Caption model `{model_info['name']}`", "",
             f"Produced by `{command.strip()}`" + (f"; training recipe: `{model_info['recipe']}`." if
                                                   model_info.get("recipe") else "."), "",
             f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, torch threads {args.threads}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "### (a) Fresh renders (seed stream never used in training), greedy decoding", "",
             f"{args.n} scenes per row, rendered at {model_info['S']} x {model_info['S']}; 'augmented' adds the "
             "training augmentations (shift <= 0.04 S, size +-10 %).", "",
             "| geometry | anti-aliasing | exact match | size | colour | kind | position | background |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'augmented' if r['augmented'] else 'nominal'} | {'on' if r['antialias'] else 'off'} | "
                     f"**{pct(r['exact'])}** | " + " | ".join(pct(r[a]) for a in ATTRS) + " |")
    if rows_beam:
        lines += ["", "Beam search (4 beams), same scenes:", "", "| geometry | anti-aliasing | exact match |",
                  "|---|---|---|"]
        for r in rows_beam:
            lines.append(f"| {'augmented' if r['augmented'] else 'nominal'} | {'on' if r['antialias'] else 'off'} | "
                         f"{pct(r['exact'])} |")
    errs = [e for r in rows for e in r["errors"]][:6]
    if errs:
        lines += ["", "Some errors (truth -> caption):", ""] + [f"- `{c}` -> `{p}`" for c, p in errs]
    lines += ["", "### (b) Round trip: caption -> image generator -> caption generator", ""]
    if rt is None:
        lines.append(rt_note)
    else:
        lines += [f"{rt['n']} random captions, image model `{args.image_model}`, 20 DPM-Solver++ steps, seed = index.",
                  "", "| measure | rate |", "|---|---|",
                  f"| caption generator's caption == prompt | **{pct(rt['caption_equals_prompt'])}** |",
                  f"| analyzer's reading == prompt | {pct(rt['analyzer_equals_prompt'])} |",
                  f"| caption generator == analyzer | {pct(rt['caption_equals_analyzer'])} |", "",
                  "| attribute | caption generator vs prompt | analyzer vs prompt |", "|---|---|---|"]
        for a in ATTRS:
            lines.append(f"| {a} | {pct(rt['caption_attrs'][a])} | {pct(rt['analyzer_attrs'][a])} |")
    lines += ["", f"### (c) Latency per image (CPU, {args.threads} thread, {args.latency_n} images, "
              "preprocessing + encoder + decoding)", "", "| decoding | median | p90 | mean |", "|---|---|---|---|"]
    for beams, v in lat.items():
        name = "greedy" if beams == 1 else f"beam search, {beams} beams"
        lines.append(f"| {name} | {v['median_ms']:.1f} ms | {v['p90_ms']:.1f} ms | {v['mean_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "resources/models/shapes-captioner"))
    p.add_argument("--image-model", default=str(ROOT / "resources/models/shapes-diffusion"))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--roundtrip", type=int, default=200)
    p.add_argument("--skip-roundtrip", action="store_true")
    p.add_argument("--skip-beam", action="store_true", help="skip table (a) with 4 beams")
    p.add_argument("--latency-n", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--update-studio", action="store_true", help="record the scores in the model's studio.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from plugins.caption.pipeline import CaptionPipeline

    folder = Path(args.model)
    pipe = CaptionPipeline.from_folder(folder)
    S = pipe.config.encoder.image_size
    rows = eval_renders(pipe, args.n, S)
    rows_beam = None if args.skip_beam else eval_renders(pipe, args.n, S, num_beams=4)
    rt, rt_note = None, ""
    image_folder = Path(args.image_model)
    if args.skip_roundtrip:
        rt_note = "Not run (--skip-roundtrip)."
    elif not (image_folder / "config.json").is_file():
        rt_note = f"Not run: no image model at {image_folder}."
    else:
        rt = eval_roundtrip(pipe, image_folder, args.roundtrip)
    lat = eval_latency(pipe, S, args.latency_n)
    studio = json.loads((folder / "studio.json").read_text()) if (folder / "studio.json").is_file() else {}
    info = {"name": folder.name, "S": S, "argv": sys.argv[1:] if argv is None else argv,
            "recipe": studio.get("recipe", {}).get("command")}
    text = markdown(args, info, rows, rows_beam, rt, lat, rt_note)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text("# Caption generator benchmarks\n\n"
                                       "Written by `benchmarks/eval_caption.py`; rerun it to refresh. Scenes follow "
                                       "`shared/specs/shapes.md`; exact match means the whole caption equals the "
                                       "scene's caption word for word.\n\n" + text)
    if args.update_studio:
        path = folder / "studio.json"
        studio = json.loads(path.read_text()) if path.is_file() else {}
        scores = {"eval_command": "python benchmarks/eval_caption.py " + " ".join(info["argv"]),
                  "fresh_renders_n": args.n}
        for r in rows:
            key = f"exact_{'augmented' if r['augmented'] else 'nominal'}_{'aa' if r['antialias'] else 'noaa'}"
            scores[key] = round(r["exact"], 4)
        if rows_beam:
            for r in rows_beam:
                key = f"exact_beam4_{'augmented' if r['augmented'] else 'nominal'}_{'aa' if r['antialias'] else 'noaa'}"
                scores[key] = round(r["exact"], 4)
        if rt:
            scores.update(roundtrip_n=rt["n"], roundtrip_caption_equals_prompt=round(rt["caption_equals_prompt"], 4),
                          roundtrip_analyzer_equals_prompt=round(rt["analyzer_equals_prompt"], 4))
        scores.update(latency_greedy_ms=round(lat[1]["median_ms"], 2), latency_beam4_ms=round(lat[4]["median_ms"], 2),
                      latency_threads=args.threads)
        studio["scores"] = scores
        path.write_text(json.dumps(studio, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
