"""Benchmark: PyTorch vs onnxruntime (fp32 and int8) on the CPU, in one run.

    .venv/bin/python benchmarks/onnx_vs_torch.py [--threads N] [--tokens 128] [--write docs/benchmarks_onnx.md]

Measures: decode tokens/s of the built-in text model and of a GPT-2-small-shaped model (124M parameters, random
weights) under torch, onnxruntime fp32 and onnxruntime int8, each next to the read-bandwidth ceiling (measured
read bandwidth / bytes of weights read per token); greedy agreement torch vs onnx; seconds per image at 20 steps;
caption latency. Exports go to a temporary folder (the models' own folders are not touched).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """GB/s reading a ``mib`` MiB float32 buffer (best of ``repeats``) with ``np.max`` (SIMD, little compute) on
    ``threads`` threads, each over its own slice; the best of 1 thread and ``threads`` threads."""
    buf = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.max(buf)
        best = max(best, buf.nbytes / (time.perf_counter() - t) / 1e9)
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def graph_file(export_folder: Path, name: str = "decoder") -> Path:
    """The file of graph ``name`` in an export folder, as its manifest names it (model.onnx for text exports)."""
    man = json.loads((Path(export_folder) / "onnx.json").read_text(encoding="utf-8"))
    return Path(export_folder) / man["graphs"][name]["file"]


def export_bytes(graph_path: Path) -> int:
    """A graph's file and its weights file beside it."""
    data = graph_path.with_name(graph_path.name + ".data")
    return graph_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def initializer_bytes(graph_path: Path) -> int:
    """Bytes of the graph's weights as stored, each initializer once."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def bytes_per_token(graph_path: Path) -> int:
    """Bytes of initializers a decode step reads: all of them except tables used only by Gather (embeddings)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_path))
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        if consumers.get(init.name) == {"Gather"}:
            continue
        total += numpy_helper.to_array(init).nbytes
    return total


def decode_rate(step, prompt, n: int, to_int) -> tuple:
    """(tokens/s from the median of ``n`` greedy decode steps after the prompt, the tokens)."""
    logits, past = step(prompt, None)
    toks, times = [], []
    for _ in range(n):
        tok = to_int(logits)
        toks.append(tok)
        t = time.perf_counter()
        logits, past = step(np.array([[tok]], dtype=np.int64), past)
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times)), toks


class SustainedRead:
    """The read bandwidth a decode step can hope for, measured the way the step is: ``nbytes`` (the bytes of
    weights one step reads) in one buffer, read with ``np.max`` on ``threads`` threads (a slice each), timed
    read by read. Returns GB/s of (the median read, the best read)."""

    def __init__(self, nbytes: int, threads: int):
        self.buf = np.ones(max(nbytes, 1 << 20) // 4, dtype=np.float32)
        self.parts = np.array_split(self.buf, threads)
        self.pool = ThreadPoolExecutor(threads)

    def __call__(self, reads: int = 16) -> tuple:
        times = []
        for _ in range(reads):
            t = time.perf_counter()
            list(self.pool.map(np.max, self.parts))
            times.append(time.perf_counter() - t)
        return self.buf.nbytes / float(np.median(times)) / 1e9, self.buf.nbytes / min(times) / 1e9

    def close(self) -> None:
        self.pool.shutdown()
        self.buf = self.parts = None


ROUNDS = 5
IN_CACHE_BYTES = 64 << 20  # weights below this stay in this machine's caches between steps


def text_rows(name: str, folder: Path, family: str, entry, host, work: Path, tokens: int, bw: float, threads: int,
              log) -> tuple:
    import torch

    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import Export
    from engine.errors import ParityError
    from plugins.text.onnx import load_torch_model
    from engine.onnx_export import export_model

    rows, notes = [], []
    exports = {}
    for q in (None, "int8", "int4"):
        t = time.perf_counter()
        try:
            man = export_model(host, entry, out_dir=work / f"{name}-{q or 'fp32'}", quantize=q, log=log)
        except ParityError as exc:  # the gate refused a quantized graph (random weights: flat logits flip top-1)
            if q is None:
                raise
            notes.append(f"{name} {q}: refused by the parity gate, so not measured: {exc}")
            continue
        exports[q] = (Path(man["folder"]), man)
        notes.append(f"{name} {q or 'fp32'} export: {time.perf_counter() - t:.0f} s, parity "
                     f"{man['parity']['decoder_logits']['max_abs_diff']:.2g} (tolerance "
                     f"{man['parity']['decoder_logits']['tolerance']:g})")
        if q:
            notes.append(f"{name} {q} quality: {json.dumps(man['quantization']['quality'])}; gate: "
                         f"{json.dumps(man['parity'][f'decoder_logits_{q}'])}")
    model = load_torch_model(folder, family)
    weights = sum(t.numel() * 4 for t in {id(t): t for t in model.parameters()}.values())  # each tensor once, fp32
    fp32_file = graph_file(exports[None][0])
    size, read = export_bytes(fp32_file), bytes_per_token(fp32_file)
    for q in ("int8", "int4"):
        if q in exports:
            g = graph_file(exports[q][0])
            stored, total = initializer_bytes(g), export_bytes(g)
            notes.append(f"{name} {q}: weights as stored (quantized blocks and scales, the rest fp32, each tensor "
                         f"once) {stored / 1e6:.3f} MB; graph + data files {total / 1e6:.3f} MB "
                         f"({100 * (total / stored - 1):+.1f} %; the data file alone "
                         f"{100 * (g.with_name(g.name + '.data').stat().st_size / stored - 1):+.1f} %)")
    notes.append(f"{name}: lean export (#20): fp32 weights {weights / 1e6:.3f} MB; fp32 graph + data files "
                 f"{size / 1e6:.3f} MB ({100 * (size / weights - 1):+.1f} %); bytes read per decode step "
                 f"{read / 1e6:.3f} MB ({100 * (read / weights - 1):+.1f} %; Gather-only tables are not read whole)")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, size=(1, 16)).astype(np.int64)
    n = min(tokens, (model.config.max_position_embeddings if family == "llama" else model.config.n_positions) - 17)

    def torch_step(ids, past):
        with torch.inference_mode():
            logits, past = model.step(torch.from_numpy(ids), past)
        return logits, past

    steppers = {"torch fp32": (torch_step, bytes_per_token(graph_file(exports[None][0])))}
    for q in exports:
        export = Export(exports[q][0], threads=threads)
        dec = OnnxDecoder(export.session("decoder"), export.manifest["config"])
        steppers[f"onnxruntime {q or 'fp32'}"] = (lambda ids, past, dec=dec: dec.step(ids, past),
                                                             bytes_per_token(graph_file(exports[q][0])))
    argmax = lambda l: int(l[0].argmax())  # noqa: E731
    for step, _ in steppers.values():
        decode_rate(step, prompt, 8, argmax)  # warm-up
    # This VM's speed drifts by tens of percent within a minute, so nothing is compared across minutes: the
    # backends take turns for ROUNDS rounds, and each pass sits between two reads of a buffer as large as the
    # fp32 weights (SustainedRead, timed like the decode steps). A pass's ceiling is the mean of the two median
    # reads around it (and, stricter, the better of their two best reads); each figure is the median over the
    # rounds of its per-round value.
    nbytes = steppers["onnxruntime fp32"][1]
    probe = SustainedRead(nbytes, threads)
    per_round = {k: [] for k in steppers}  # (tokens/s, median-read GB/s, best-read GB/s, torch's tokens/s)
    tokens_of = {}
    try:
        before = probe()
        for _ in range(ROUNDS):
            got = {}
            for backend, (step, _) in steppers.items():
                rate, tokens_of[backend] = decode_rate(step, prompt, n, argmax)
                after = probe()
                got[backend] = (rate, (before[0] + after[0]) / 2, max(before[1], after[1]))
                before = after
            for backend, (rate, median, best) in got.items():
                per_round[backend].append((rate, median, best, got["torch fp32"][0]))
    finally:
        probe.close()
    for backend, (_, nb) in steppers.items():
        runs = per_round[backend]
        rows.append((name, backend, float(np.median([r for r, *_ in runs])),
                     float(np.median([m for _, m, _, _ in runs])) * 1e9 / nb, nb,
                     float(np.median([r * nb / (m * 1e9) for r, m, _, _ in runs])),
                     float(np.median([r * nb / (b * 1e9) for r, _, b, _ in runs])),
                     float(np.median([r / t for r, _, _, t in runs]))))
    fp32 = per_round["onnxruntime fp32"]
    if nbytes >= IN_CACHE_BYTES:  # from main memory: the ceiling is a limit, so show how each round fared
        notes.append(f"{name}: onnxruntime fp32 per round: "
                     + ", ".join(f"{r:.1f} tok/s at {m:.1f} GB/s median read, {b:.1f} best "
                                 f"({100 * r * nbytes / (m * 1e9):.0f} %, {100 * r * nbytes / (b * 1e9):.0f} %)"
                                 for r, m, b, _ in fp32)
                     + f"; the peak-burst bandwidth of the start ({bw:.1f} GB/s, `read_bandwidth`, the old "
                     f"method) would put the median pass at "
                     f"{100 * np.median([r for r, *_ in fp32]) * nbytes / (bw * 1e9):.0f} %")
        notes.append(f"{name}: the int8 rows' ceiling comes from reads of the fp32 size ({nbytes / 1e6:.0f} MB); "
                     f"a buffer of the int8 size reads about 5 % faster, so their % is about 5 % high")
    toks_t, toks = tokens_of["torch fp32"], {None: tokens_of["onnxruntime fp32"], "int8": tokens_of["onnxruntime int8"]}
    same = next((i for i, (a, b) in enumerate(zip(toks_t, toks[None])) if a != b), len(toks_t))
    notes.append(f"{name}: greedy tokens torch vs onnxruntime fp32 identical for {same}/{len(toks_t)} tokens; "
                 f"int8 vs fp32 for "
                 f"{next((i for i, (a, b) in enumerate(zip(toks[None], toks['int8'])) if a != b), len(toks_t))}"
                 f"/{len(toks_t)}")
    return rows, notes


def gpt2_small_folder(folder: Path) -> Path:
    """A GPT-2-small-shaped (124M) model folder with random weights (fp16 safetensors)."""
    import torch
    from safetensors.torch import save_file

    from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024,
           "n_embd": 768, "n_layer": 12, "n_head": 12, "activation_function": "gelu_new", "bos_token_id": 50256,
           "eos_token_id": 50256, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "studio.json").write_text(json.dumps({"generator": "text", "family": "gpt2", "title": "gpt2-124m"}))
    return folder


def fake_entry(folder: Path, family: str, generator: str):
    from engine.store import ModelEntry, content_hash

    return ModelEntry(folder.name, folder, family, generator, False, content_hash(folder), 0, folder.name,
                      json.loads((folder / "config.json").read_text()), {})


def median_seconds(fn, n: int) -> float:
    """The median wall time of ``n`` calls of ``fn()``."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def median_turns(calls: dict, items: list, rounds: int = 3) -> tuple:
    """({backend: median seconds per item}, {backend: outputs of the last round}): each ``calls[backend](item)``
    over ``items``, the backends taking turns for ``rounds`` rounds, since this VM's speed drifts."""
    times, outs = {name: [] for name in calls}, {}
    for _ in range(rounds):
        for name, fn in calls.items():
            outs[name] = []
            for item in items:
                t = time.perf_counter()
                outs[name].append(fn(item))
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}, outs


def caption_rows(entry, host, work: Path, threads: int, log) -> tuple:
    from PIL import Image

    from plugins.caption.pipeline import CaptionPipeline
    from engine.onnx_export import export_model
    from engine.shapes import render, sample_scene

    rows, notes = [], []
    folder = Path(entry.path)
    pipes = {"torch fp32": CaptionPipeline.from_folder(folder, backend="torch")}
    for q in (None, "int8"):
        man = export_model(host, entry, out_dir=work / f"caption-{q or 'fp32'}", quantize=q, log=log)
        notes.append(f"caption {q or 'fp32'} parity: " + json.dumps(man["parity"]))
        if q:
            notes.append("caption int8 quality: " + json.dumps(man["quantization"]["quality"]))
        pipes[f"onnxruntime {q or 'fp32'}"] = CaptionPipeline.from_export(folder, man["folder"], threads=threads)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(render(sample_scene(rng), 32, antialias=bool(i % 2))) for i in range(20)]
    for pipe in pipes.values():
        pipe(images[0])  # warm-up
    seconds, outs = median_turns({name: (lambda im, p=pipe: p(im).token_ids) for name, pipe in pipes.items()}, images)
    rows += [("caption (greedy)", name, seconds[name] * 1000) for name in pipes]
    same = sum(a == b for a, b in zip(outs["torch fp32"], outs["onnxruntime fp32"]))
    notes.append(f"captions torch vs onnxruntime fp32 identical: {same}/{len(images)}; int8 vs fp32: "
                 f"{sum(a == b for a, b in zip(outs['onnxruntime fp32'], outs['onnxruntime int8']))}/{len(images)}")
    return rows, notes


def image_rows(entry, host, work: Path, threads: int, log) -> tuple:
    from plugins.image.model import load
    from plugins.image.pipeline import TorchDenoiser, TorchTextEncoder
    from plugins.image.onnx import OnnxDenoiser, OnnxTextEncoder, generate
    from engine.backends.runtime import Export
    from engine.onnx_export import export_model
    from engine.shapes import analyze, caption, sample_scene

    rows, notes = [], []
    loaded = load(Path(entry.path))
    nets = {"torch fp32": (TorchTextEncoder(loaded.text_encoder), TorchDenoiser(loaded.unet))}
    for q in (None, "int8"):
        man = export_model(host, entry, out_dir=work / f"image-{q or 'fp32'}", quantize=q, log=log)
        notes.append(f"image {q or 'fp32'} parity: " + json.dumps(man["parity"]))
        if q:
            notes.append("image int8 quality: " + json.dumps(man["quantization"]["quality"]))
        ex = Export(Path(man["folder"]), threads=threads)
        nets[f"onnxruntime {q or 'fp32'}"] = (OnnxTextEncoder(ex.session("text_encoder")),
                                              OnnxDenoiser(ex.session("unet")))
    captions = [caption(sample_scene(np.random.default_rng(100 + i))) for i in range(5)]
    calls = {}
    for name, pair in nets.items():
        generate(loaded, pair, captions[:1], 2, seed=0)  # warm-up
        calls[name] = lambda item, pair=pair: generate(loaded, pair, [item[1]], 20, seed=item[0])
    seconds, outs = median_turns(calls, list(enumerate(captions)))
    rows += [("image (20 steps, guidance 3)", name, seconds[name]) for name in nets]
    imgs = {name: np.concatenate(got) for name, got in outs.items()}
    a, b = imgs["torch fp32"], imgs["onnxruntime fp32"]
    notes.append(f"images torch vs onnxruntime fp32 (same seeds): max pixel difference "
                 f"{int(np.abs(a.astype(int) - b.astype(int)).max())}, analyzer reads "
                 f"{sum(analyze(x) == analyze(y) for x, y in zip(a, b))}/{len(a)} identically")
    return rows, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: builtin-text,gpt2-124m,image,caption")
    p.add_argument("--write", metavar="MD", help="also write the results as markdown to this file")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.environ["STUDIO_ONNX_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.onnx_table import DOC_HEAD, DOC_TAIL, render
    from engine.backends.common import versions
    from engine.plugins import DEFAULT_PLUGINS, PluginHost
    from engine.store import ModelStore

    log = lambda m: print(f"  {m}", file=sys.stderr, flush=True)  # noqa: E731
    builtins = DEFAULT_PLUGINS
    host = PluginHost(safe_mode=True, disabled=[], builtins=builtins).load()
    store = ModelStore(host, user_dir=Path(tempfile.mkdtemp()))
    builtin = {e.generator: e for e in store.list() if e.builtin}
    load_before = uptime()
    bw = read_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw:.1f} GB/s", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    text, other, notes = [], [], []

    def part(name, fn):
        if name in skip:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
            notes.append(f"{name}: FAILED ({type(exc).__name__}: {exc})")
            print(f"{name} failed: {exc!r}", file=sys.stderr)

    def builtin_text():
        e = builtin.get("text")
        if e is None:
            notes.append("built-in text model: not installed, skipped")
            return
        r, n = text_rows(e.name, Path(e.path), e.family, e, host, work, args.tokens, bw, args.threads, log)
        text.extend(r)
        notes.extend(n)

    def gpt2_124m():
        folder = gpt2_small_folder(work / "gpt2-124m")
        r, n = text_rows("gpt2-124m (random)", folder, "gpt2", fake_entry(folder, "gpt2", "text"), host, work,
                         min(args.tokens, 64), bw, args.threads, log)
        text.extend(r)
        notes.extend(n)

    def builtin_rows(generator, rows_fn, unit):
        e = builtin.get(generator)
        if e is None:
            notes.append(f"built-in {generator} model: not installed, skipped")
            return
        r, n = rows_fn(e, host, work, args.threads, log)
        other.extend((a, b, unit(c)) for a, b, c in r)
        notes.extend(n)

    def image():
        builtin_rows("image", image_rows, lambda c: f"{c:.3f} s/image")

    def caption():
        builtin_rows("caption", caption_rows, lambda c: f"{c:.1f} ms/caption")

    try:
        for name, fn in (("builtin-text", builtin_text), ("gpt2-124m", gpt2_124m), ("image", image),
                         ("caption", caption)):
            part(name, fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = uptime()
    v = versions()
    header = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {args.threads} threads (torch and onnxruntime intra-op), "
              f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}.",
              f"Read bandwidth measured: {bw:.1f} GB/s (numpy max over 512 MiB, {args.threads} threads, best of 5).",
              f"Load before: `{load_before}`; after: `{load_after}`.", ""]
    text_out = render(text, other, notes, header)
    print(text_out)
    if args.write:
        command = " ".join(["benchmarks/onnx_vs_torch.py"] + list(argv if argv is not None else sys.argv[1:]))
        Path(args.write).write_text(DOC_HEAD.format(command=command) + text_out + DOC_TAIL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
