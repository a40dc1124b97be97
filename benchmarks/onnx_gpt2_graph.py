"""The GPT-2 export form (GPT2LMHeadModel.fuse_for_export) against the model traced as written, on the CPU.

    .venv/bin/python benchmarks/onnx_gpt2_graph.py [--rounds 6]

Two measurements; each takes turns between the two exports and reports medians:
- fixed cost per decode step: a 12-layer GPT-2 with tiny weights (width 96), so the step is all per-node cost.
  Also times a bare ``session.run`` on the same inputs, to show what Python's ``OnnxDecoder.step`` adds.
- the built-in captioner: median latency of a greedy caption over 20 renders, with 1 thread (its default),
  and whether the two exports write the same captions.

Graph node counts are those after onnxruntime's own optimizations.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_vs_torch import decode_rate, median_seconds, median_turns  # noqa: E402


@contextlib.contextmanager
def plain_export(plain: bool):
    """Within: export_decoder traces the model as written instead of its export form (fuse_for_export)."""
    from engine.nn.gpt2 import GPT2LMHeadModel

    fuse = GPT2LMHeadModel.fuse_for_export
    if plain:
        GPT2LMHeadModel.fuse_for_export = lambda self: self
    try:
        yield
    finally:
        GPT2LMHeadModel.fuse_for_export = fuse


def optimized_nodes(path: Path) -> int:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def fixed_cost(rounds: int, work: Path) -> list:
    import torch

    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_session
    from plugins.text.onnx import export_decoder, runtime_config
    from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=96, n_head=12, n_layer=12)).eval()
    cfg = runtime_config(model, "gpt2")
    decs, nodes = {}, {}
    for name in ("compact", "plain"):
        path = work / f"tiny-{name}.onnx"
        with plain_export(name == "plain"):
            export_decoder(model, cfg, path)
        decs[name], nodes[name] = OnnxDecoder(open_session(path, threads=1), cfg), optimized_nodes(path)
    step, bare = {k: [] for k in decs}, {k: [] for k in decs}
    for r in range(rounds):
        for name in (("compact", "plain") if r % 2 == 0 else ("plain", "compact")):
            dec = decs[name]
            step[name].append(1e3 / decode_rate(dec.step, np.arange(16)[None], 64, lambda l: int(l[0].argmax()))[0])
            _, past = dec.step(np.arange(48)[None], None)  # a past as long as the middle decode step's
            feeds = {"input_ids": np.array([[1]])}
            for i, (k, v) in enumerate(past.kv):
                feeds[dec.past_names[2 * i]], feeds[dec.past_names[2 * i + 1]] = k, v
            bare[name].append(1e3 * median_seconds(lambda: dec.session.run(dec.output_names, feeds), 64))
    return [f"| 12-layer GPT-2, width 96: decode step (1 thread) | {name} | {nodes[name]} | "
            f"{np.median(step[name]):.3f} ms (bare session.run {np.median(bare[name]):.3f} ms) |" for name in decs]


def caption(rounds: int, work: Path) -> list:
    from PIL import Image

    from plugins.caption.pipeline import CaptionPipeline
    from engine.onnx_export import export_model
    from engine.plugins import DEFAULT_PLUGINS, PluginHost
    from engine.shapes import render, sample_scene
    from engine.store import ModelStore

    host = PluginHost(safe_mode=True, disabled=[],
                      builtins=DEFAULT_PLUGINS).load()
    entry = next(e for e in ModelStore(host, user_dir=work / "models").list() if e.builtin and e.generator == "caption")
    folder = Path(entry.path)
    pipes, nodes = {}, {}
    for name in ("compact", "plain"):
        with plain_export(name == "plain"):
            man = export_model(host, entry, out_dir=work / f"caption-{name}")
        pipes[name] = CaptionPipeline.from_export(folder, man["folder"], threads=1)
        nodes[name] = optimized_nodes(Path(man["folder"]) / "decoder.onnx")
    rng = np.random.default_rng(5)
    images = [Image.fromarray(render(sample_scene(rng), 32, antialias=bool(i % 2))) for i in range(20)]
    for pipe in pipes.values():
        pipe(images[0])  # warm-up
    seconds, outs = median_turns({name: (lambda im, p=pipe: p(im).token_ids) for name, pipe in pipes.items()},
                                 images, rounds)
    same = sum(a == b for a, b in zip(outs["compact"], outs["plain"]))
    return [f"| built-in captioner: greedy caption (1 thread) | {name} | {nodes[name]} (decoder) | "
            f"{seconds[name] * 1e3:.2f} ms |" for name in pipes] + [
        f"| built-in captioner: the same captions | | | {same}/{len(images)} |"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpt2-graph-") as tmp:
        rows = fixed_cost(args.rounds, Path(tmp)) + caption(args.rounds, Path(tmp))
    print("| measurement | export | graph nodes | median |\n|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
