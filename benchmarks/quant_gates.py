"""The quantized graphs' own gate figures for the built-in image and caption models (issue #20 item 3).

    .venv/bin/python benchmarks/quant_gates.py

Exports each built-in model at int8 and int4 into a temporary folder and prints the relative error of each
quantized graph against the fp32 graph (the gate: engine/backends/common.py QUANT_REL_TOLERANCE) and the quality
figures the export measures. The text model's quantized gate (top-1 agreement, logit difference) is in
docs/benchmarks_onnx.md already.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="quant-gates-"))
    from engine.onnx_export import export_model
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host)
    print("| model | scheme | relative error of each graph (tolerance) | quality |\n|---|---|---|---|")
    for name in ("shapes-diffusion", "shapes-captioner"):
        entry = store.get(name)
        for scheme in ("int8", "int4"):
            with tempfile.TemporaryDirectory() as d:
                m = export_model(host, entry, out_dir=Path(d) / "export", quantize=scheme)
                gates = ", ".join(f"{k} {v['relative_error']:.3g} ({v['tolerance']:g})" for k, v in m["parity"].items()
                                  if k.endswith(scheme) and "relative_error" in v)
                print(f"| {name} | {scheme} | {gates} | {json.dumps(m['quantization']['quality'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
