"""Loading exports safely: corrupt graphs, external data outside the folder, symlinks, damaged manifests."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.errors import ModelError
from engine.backends.runtime import Export, check_graph, open_export


def _tiny_graph(path, external_location=None):
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    if external_location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external_location), ("offset", "0"), ("length", "16")):
            e = w.external_data.add()
            e.key, e.value = k, v
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


EXPORT_FAMILY = "gpt2"


def test_good_export_opens(copy):
    export = open_export(copy)
    assert export.session("decoder") is not None


def test_truncated_graph_refused(copy):
    path = copy / "onnx" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="truncated"):
        open_export(copy)


def test_corrupt_graph_refused(copy, tmp_path):
    path = copy / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[100:200] = b"\xff" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        open_export(copy)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf model \xff\xfe" * 10)
    with pytest.raises(ModelError, match="corrupt|checker"):
        check_graph(garbage)


def test_manifest_naming_missing_file_refused(copy):
    manifest = json.loads((copy / "onnx" / "onnx.json").read_text())
    manifest["files"]["extra.bin"] = {"bytes": 4, "sha256": "00"}
    (copy / "onnx" / "onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="lacks the file extra.bin"):
        open_export(copy)
    manifest["files"] = {"../config.json": {"bytes": 1}}
    (copy / "onnx" / "onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="outside the export folder"):
        open_export(copy)
    (copy / "onnx" / "onnx.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        open_export(copy)


def test_external_data_outside_refused(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    _tiny_graph(folder / "g.onnx", external_location="../secret.bin")
    with pytest.raises(ModelError, match="outside its own export folder"):
        check_graph(folder / "g.onnx")
    os.symlink(tmp_path / "secret.bin", folder / "link.bin")
    _tiny_graph(folder / "h.onnx", external_location="link.bin")
    with pytest.raises(ModelError, match="outside its own export folder"):
        check_graph(folder / "h.onnx")
    (folder / "data.bin").write_bytes(np.ones((2, 2), np.float32).tobytes())
    _tiny_graph(folder / "ok.onnx", external_location="data.bin")
    check_graph(folder / "ok.onnx")  # external data inside the folder is fine
    _tiny_graph(folder / "plain.onnx")
    check_graph(folder / "plain.onnx")


def test_symlinked_graph_refused(copy, tmp_path):
    path = copy / "onnx" / "model.onnx"
    moved = tmp_path / "elsewhere.onnx"
    shutil.move(path, moved)
    os.symlink(moved, path)
    with pytest.raises(ModelError, match="symbolic link"):
        Export(copy / "onnx")
