"""Exporter helpers shared by the families (torch is imported inside functions only).

``export_graph`` runs the TorchScript exporter with dynamic axes;
``graph_io`` reads names, shapes and types back from the written file; ``quantize_graph`` applies
onnxruntime's weight-only int8 / int4 quantization (``MatMulNBits``).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17
DECODER_TOLERANCE = 1e-3  # max |logit difference|, fp32, over prefill and cached decode steps


def kv_names(n_layers: int, prefix: str) -> list:
    return [f"{prefix}.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]


def export_graph(module, args: tuple, path: Path, input_names: list, output_names: list, dynamic_axes: dict,
                 opset: int = OPSET) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamic axes), falling back to the dynamo exporter."""
    import torch

    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        except TypeError:  # a torch without the TorchScript exporter
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=True)


_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 3: "int8", 2: "uint8"}


def graph_io(path: Path) -> dict:
    """``{"inputs": [{"name", "shape", "dtype"}], "outputs": [...]}`` read from the graph file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                    for d in t.shape.dim]
            out.append({"name": v.name, "shape": dims, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type))})
        return out

    init = {i.name for i in model.graph.initializer}
    return {"inputs": describe([i for i in model.graph.input if i.name not in init]),
            "outputs": describe(model.graph.output), "opset": max(o.version for o in model.opset_import
                                                                   if o.domain in ("", "ai.onnx"))}


QUANT_BLOCK = 128
QUANTIZATIONS = {
    "int8": {"method": "onnxruntime MatMulNBitsQuantizer (weight-only)", "bits": 8, "block_size": QUANT_BLOCK,
             "symmetric": True, "accuracy_level": 4, "op_types": ["MatMul"],
             "why": "a decoder at batch 1 is bound by reading its weights: int8 weights read a quarter of the "
                    "bytes, and accuracy level 4 multiplies in int8; benchmarks/onnx_vs_torch.py measured a "
                    "124M GPT-2 at 3.2-3.5x torch fp32, where quantize_dynamic (QInt8) gave 2.1-2.3x"},
    "int4": {"method": "onnxruntime MatMulNBitsQuantizer (weight-only)", "bits": 4, "block_size": 32,
             "symmetric": True, "accuracy_level": 4, "op_types": ["MatMul"],
             "why": "half the bytes of int8 (an eighth of fp32) for the MatMul weights; blocks of 32 keep the "
                    "rounding error local, at the quality cost the export measures and the gate bounds"},
}
QUANTIZATION = QUANTIZATIONS["int8"]  # the default scheme


EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GB: larger graphs keep their weights in a .data file


def quantize_graph(src: Path, dst: Path, scheme: str = "int8") -> None:
    """Weight-only quantization of every MatMul with a constant weight (``MatMulNBits``, QUANTIZATIONS[scheme]:
    8 bits in blocks of 128 or 4 bits in blocks of 32 values along the input dimension, one fp32 scale each); at
    accuracy level 4 onnxruntime quantizes the activations to int8 on the fly for the multiply. A tied
    embedding / output table is stored once, quantized (``quant_tables.share``), and at int4 it stays at 8 bits (as
    llama.cpp keeps its token table and output at higher precision: a 4-bit input embedding cost the built-in model
    8 points of top-1 agreement). A graph near protobuf's 2 GB limit is written with its weights in ``<name>.data``
    beside it (inside the export folder)."""
    import onnx

    from engine.backends.quant_tables import share, tied_heads

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every node on the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.load(str(src))
            heads = set(tied_heads(model)) if QUANTIZATIONS[scheme]["bits"] == 4 else set()
            groups = _groups(model, scheme, heads)
            every = {n for nodes in groups.values() for n in nodes}
            for (bits, block), nodes in sorted(groups.items()):
                q = dict(QUANTIZATIONS["int8" if bits == 8 else "int4"], block_size=block)
                model = _quantized(model, q, exclude=sorted(every - set(nodes)))
            share(model)
            big = sum(p.stat().st_size for p in Path(src).parent.iterdir() if p.is_file()) > EXTERNAL_DATA_BYTES
            onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                            location=Path(dst).name + ".data")
    finally:
        root.setLevel(level)


def _groups(model, scheme: str, heads: set) -> dict:
    """{(bits, block size): [MatMul node names]}: each constant-weight MatMul with the largest block of at most the
    scheme's that divides its input size K (down to 16), so no block is padded (a 192-wide model in blocks of 128
    stored a third more bytes than its weights); ``heads`` at 8 bits."""
    inits = {t.name: t for t in model.graph.initializer}
    groups: dict = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        q = QUANTIZATIONS["int8" if node.name in heads else scheme]
        K, block = int(inits[node.input[1]].dims[0]), q["block_size"]
        while block > 16 and K % block:
            block //= 2
        groups.setdefault((q["bits"], block), []).append(node.name)
    return groups


def _quantized(model, q: dict, exclude=None):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=q["block_size"], is_symmetric=q["symmetric"],
                                          accuracy_level=q["accuracy_level"], bits=q["bits"])
    quantizer = MatMulNBitsQuantizer(model, bits=q["bits"], block_size=q["block_size"], is_symmetric=q["symmetric"],
                                     accuracy_level=q["accuracy_level"], algo_config=config,
                                     nodes_to_exclude=exclude)  # (nodes_to_include only adds to the op types)
    quantizer.process()
    return quantizer.model.model


EXTERNAL_MIN_BYTES = 1024  # initializers at least this large go to the .data file
EXTERNAL_ALIGN = 4096  # each starts on a page boundary, so it can be mapped where it lies


def externalize(path: Path) -> bool:
    """Move a graph's weights into ``<graph>.data`` beside it, each page-aligned, so onnxruntime maps them from
    the file instead of copying them out of the parsed graph (and the graph itself stays small to parse and
    check). Weights already outside in other files (the exporter writes one file per tensor for a model over
    protobuf's 2 GB) are gathered into that one file, streamed, and their files removed. A graph already laid out
    this way, or with no weights, is left as it is; returns whether it was rewritten."""
    import onnx
    from onnx import external_data_helper as edh

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    tensors = [t for t in edh._get_all_tensors(proto)]
    outside = {t.name: {e.key: e.value for e in t.external_data} for t in tensors if edh.uses_external_data(t)}
    if outside and {i.get("location") for i in outside.values()} == {data.name}:
        return False
    big = [t for t in tensors
           if t.name in outside or (t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES)]
    if not big:
        return False
    tmp = data.with_name(data.name + ".partial")
    with open(tmp, "wb") as f:
        for t in big:
            f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGN))
            offset = f.tell()
            if t.name in outside:
                info = outside[t.name]
                with open(path.parent / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    size = int(info["length"]) if "length" in info else -1
                    payload = src.read(size)
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
            else:
                payload = t.raw_data
                t.ClearField("raw_data")
            f.write(payload)
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    for location in {i["location"] for i in outside.values()} - {data.name}:
        (path.parent / location).unlink(missing_ok=True)
    tmp.replace(data)
    onnx.save_model(proto, str(path))
    return True


def quantize_graphs(paths: dict, scheme: str = "int8") -> dict:
    """Weight-only quantized copies of ``paths`` ({name: graph.onnx}) beside them, as {name: graph.<scheme>.onnx}."""
    out = {}
    for name, path in paths.items():
        out[name] = Path(path).with_suffix(f".{scheme}.onnx")
        quantize_graph(Path(path), out[name], scheme)
    return out


def describe_graphs(paths: dict) -> tuple:
    """``({name: {"file", "inputs", "outputs"}}, opset)`` for the written graphs ``{name: path}``."""
    graphs, opset = {}, None
    for name, path in paths.items():
        io = graph_io(path)
        graphs[name] = {"file": path.name, "inputs": io["inputs"], "outputs": io["outputs"]}
        opset = io["opset"]
    return graphs, opset


def replace_graphs(pairs) -> None:
    """Move each ``(src, dst)`` graph over its ``dst`` (the quantized graphs replace the fp32 ones)."""
    for src, dst in pairs:
        dst.unlink()
        src.rename(dst)


def max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# Quantized encoders and U-Nets: the largest relative error ||q - f|| / ||f|| of an output over the fixed parity
# inputs, against the fp32 graph (figures measured on the built-in model: docs/benchmarks_onnx.md).
QUANT_REL_TOLERANCE = {"int8": 0.05, "int4": 0.15}


def relative_gate(pairs, scheme: str, inputs: str) -> dict:
    """Gate figures of a quantized graph from ``pairs`` of (fp32 output, quantized output) arrays."""
    err = 0.0
    for ref, got in pairs:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        err = max(err, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)))
    tol = QUANT_REL_TOLERANCE[scheme]
    return {"against": "the fp32 ONNX graph", "scheme": scheme, "relative_error": float(f"{err:.3g}"),
            "max_abs_diff": float(f"{err:.3g}"), "tolerance": tol, "passed": bool(err <= tol),
            "rule": f"||quantized - fp32|| / ||fp32|| <= {tol:g} for every output", "inputs": inputs}


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import engine

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "studio": engine.__version__}
