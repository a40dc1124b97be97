"""A tied embedding table stored once in a quantized graph.

onnxruntime's weight-only quantizer turns the output head's MatMul into ``MatMulNBits`` with a quantized copy of the
table (``<table>_Q8`` / ``_Q4`` and ``<table>_scales``) but leaves the embedding's ``Gather`` reading the fp32 table:
the file then holds the table twice (the fp32 copy alone was 40 % of the built-in model's int8 file). ``share`` makes
the Gather read the quantized copy instead, dequantizing only the rows it gathers, and drops the fp32 table:

    rows = Gather(table_Q, ids)                      (n, blocks, blob) uint8
    [4 bits: low and high nibbles, low first]        (n, blocks, block)
    values = (rows - zero point) x Gather(scales)    zero point 2^(bits-1) (symmetric: the quantizer stores none)
    -> (n, K), the padding of the last block cut

The table's layout is MatMulNBits' (N, blocks, blob) with N the vocabulary, which is the embedding's row order, so
no data moves; the head keeps its kernel. The exporter stores a tied table as (K, N) and gathers along axis 1 (then
transposes), and that is the form rewritten here (an axis-0 Gather of an (N, K) table is handled the same way).
"""
from __future__ import annotations


def tied_heads(model) -> list:
    """Names of the MatMul nodes whose weight is also a Gather's table (a tied embedding and output head)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in gathered]


def share(model) -> list:
    """Rewrite ``model`` (an onnx ModelProto) in place; returns the names of the fp32 tables dropped."""
    from onnx import helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    heads = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) >= 3:
            for suffix in ("_Q8", "_Q4"):
                if node.input[1].endswith(suffix):
                    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                    heads[node.input[1][: -len(suffix)]] = (node.input[1], node.input[2], attrs)
    users: dict = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    dropped = []
    for table, (q_name, s_name, attrs) in heads.items():
        if table not in inits or q_name not in inits or s_name not in inits:
            continue
        gathers = [n for n in users.get(table, []) if n.op_type == "Gather"]
        if not gathers or len(gathers) != len(users[table]):
            continue  # the fp32 table feeds something else too: leave it
        dims = list(inits[table].dims)
        K, N = int(attrs["K"]), int(attrs["N"])
        for g in gathers:
            axis = next((helper.get_attribute_value(a) for a in g.attribute if a.name == "axis"), 0)
            if not ((axis == 1 and dims == [K, N]) or (axis == 0 and dims == [N, K])):
                break
        else:
            new_nodes = []
            for g in gathers:
                axis = next((helper.get_attribute_value(a) for a in g.attribute if a.name == "axis"), 0)
                new_nodes.append((g, _dequantized_gather(g, q_name, s_name, attrs, transpose=axis == 1)))
            for g, nodes in new_nodes:
                at = list(graph.node).index(g)
                graph.node.remove(g)
                for k, n in enumerate(nodes):
                    graph.node.insert(at + k, n)
            graph.initializer.remove(inits[table])
            dropped.append(table)
    return dropped


def _dequantized_gather(gather, q_name: str, s_name: str, attrs: dict, transpose: bool) -> list:
    """Nodes computing ``gather``'s output from the quantized table (rows of ids, dequantized)."""
    from onnx import TensorProto, helper

    bits, block, K = int(attrs.get("bits", 4)), int(attrs["block_size"]), int(attrs["K"])
    ids, out, p = gather.input[1], gather.output[0], gather.name + "/dq"
    nodes = []

    def node(op, inputs, name, **kw):
        nodes.append(helper.make_node(op, inputs, [f"{p}/{name}"], name=f"{p}/{name}", **kw))
        return f"{p}/{name}"

    def const(name, values, dtype=TensorProto.INT64):
        return node("Constant", [], name, value=helper.make_tensor(name, dtype, [len(values)], values))

    rows = node("Gather", [q_name, ids], "rows", axis=0)  # (*ids, blocks, blob) uint8
    ints = node("Cast", [rows], "ints", to=TensorProto.INT32)
    if bits == 4:
        sixteen = node("Constant", [], "sixteen", value=helper.make_tensor("sixteen", TensorProto.INT32, [], [16]))
        hi = node("Div", [ints, sixteen], "hi")
        lo = node("Sub", [ints, node("Mul", [hi, sixteen], "hi16")], "lo")
        last = const("last", [-1])
        pair = node("Concat", [node("Unsqueeze", [lo, last], "lo1"), node("Unsqueeze", [hi, last], "hi1")], "pair",
                    axis=-1)
        ints = node("Reshape", [pair, const("blockshape", [-1, block])], "nibbles")
    values = node("Sub", [node("Cast", [ints], "f", to=TensorProto.FLOAT),
                          node("Constant", [], "zp", value=helper.make_tensor("zp", TensorProto.FLOAT, [],
                                                                              [float(2 ** (bits - 1))]))], "centred")
    scales = node("Gather", [s_name, ids], "scales", axis=0)  # (*ids, blocks)
    flat_ids = node("Reshape", [ids, const("minus1", [-1])], "flat_ids")
    n = node("Shape", [flat_ids], "n")
    blocks = node("Reshape", [values, node("Concat", [n, const("rest", [-1, block])], "bshape", axis=0)], "blocks")
    scaled = node("Mul", [blocks, node("Reshape", [scales, node("Concat", [n, const("rest1", [-1, 1])], "sshape",
                                                                          axis=0)], "scales3")], "scaled")
    table = node("Reshape", [scaled, node("Concat", [n, const("rest2", [-1])], "tshape", axis=0)], "padded")
    cut = node("Slice", [table, const("start", [0]), const("end", [K]), const("axis1", [1])], "rowsK")  # (n, K)
    shape_ids = node("Shape", [ids], "ids_shape")
    if transpose:  # the (K, N) table gathered along axis 1: (K, *ids)
        flat = node("Transpose", [cut], "t", perm=[1, 0])
        full = node("Concat", [const("k", [K]), shape_ids], "oshape", axis=0)
    else:  # (*ids, K)
        flat = cut
        full = node("Concat", [shape_ids, const("k", [K])], "oshape", axis=0)
    nodes.append(helper.make_node("Reshape", [flat, full], [out], name=f"{p}/out"))
    return nodes
