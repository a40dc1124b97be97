"""What limits onnxruntime fp32 decoding of a 124M GPT-2: the whole decode step against its MatMuls alone.

    .venv/bin/python benchmarks/onnx_matmul_floor.py [--threads 2] [--rounds 4]

Exports the GPT-2-small-shaped model of benchmarks/onnx_vs_torch.py (random weights) to a temporary folder, then
alternates, in one process: a greedy decode step of the exported graph (KV cache, 48 steps after a 16-token
prompt), and a graph holding only that model's weight MatMuls (12 x [768x2304, 768x768, 768x3072, 3072x768] and
the 768x50257 lm_head) on one token, and a read of a buffer as large as those weights with ``np.max``
(``onnx_vs_torch.SustainedRead``). Each is timed call by call and reported as the median. The step minus the
MatMuls is everything else the graph does (attention, layer norms, the KV cache copies, Python); the MatMuls
against the plain read is how close onnxruntime's fp32 matrix-vector kernel comes to the machine's bandwidth.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]


def matmul_graph(threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3072])
    nodes, inits, outs = [], [], []
    rng = np.random.default_rng(0)
    for i, (k, n) in enumerate(SHAPES):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.01).astype(np.float32), f"w{i}"))
        src = "x"
        if k == 768:
            nodes.append(helper.make_node("Slice", ["x", "zero", "width", "axis"], [f"x{i}"]))
            src = f"x{i}"
        nodes.append(helper.make_node("MatMul", [src, f"w{i}"], [f"y{i}"]))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inits += [numpy_helper.from_array(np.array([v], np.int64), name) for name, v in
              (("zero", 0), ("width", 768), ("axis", 1))]
    model = helper.make_model(helper.make_graph(nodes, "matmuls", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    from engine.backends.runtime import session_options

    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    os.environ["STUDIO_ONNX_THREADS"] = str(args.threads)
    from onnx_vs_torch import SustainedRead, decode_rate, fake_entry, gpt2_small_folder, median_seconds

    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import Export
    from engine.onnx_export import export_model
    from engine.plugins import DEFAULT_PLUGINS, PluginHost

    work = Path(tempfile.mkdtemp(prefix="onnx-floor-"))
    try:
        host = PluginHost(safe_mode=True, disabled=[],
                          builtins=DEFAULT_PLUGINS).load()
        folder = gpt2_small_folder(work / "gpt2-124m")
        man = export_model(host, fake_entry(folder, "gpt2", "text"), out_dir=work / "onnx")
        export = Export(Path(man["folder"]), threads=args.threads)
        dec = OnnxDecoder(export.session("decoder"), export.manifest["config"])
        mm = matmul_graph(args.threads)
        x = np.random.default_rng(1).standard_normal((1, 3072)).astype(np.float32)
        prompt = np.random.default_rng(2).integers(0, 50000, (1, 16)).astype(np.int64)
        nbytes = sum(k * n * 4 for k, n in SHAPES)

        probe = SustainedRead(nbytes, args.threads)

        argmax = lambda logits: int(logits[0].argmax())  # noqa: E731
        decode = lambda n=32: 1 / decode_rate(dec.step, prompt, n, argmax)[0]  # noqa: E731 - seconds a step
        decode(4), median_seconds(lambda: mm.run(None, {"x": x}), 2)
        print("| round | plain read ms (GB/s) | MatMuls alone ms (% of the read) | whole decode step ms "
              "(% of the read) | the rest ms |")
        print("|---|---|---|---|---|")
        for r in range(args.rounds):
            b = nbytes / (probe()[0] * 1e9)  # seconds for one plain read of the weights (the median read)
            m = median_seconds(lambda: mm.run(None, {"x": x}), 24)
            d = decode()
            print(f"| {r} | {b * 1e3:.1f} ({nbytes / b / 1e9:.1f}) | {m * 1e3:.1f} ({100 * b / m:.0f} %) "
                  f"| {d * 1e3:.1f} ({100 * b / d:.0f} %) | {(d - m) * 1e3:.1f} |", flush=True)
        probe.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
