"""ONNX export: parity gate, manifest, output folders, refusals (tiny random models)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ParityError, ModelError, UsageError
from engine.onnx_export import export_model
from tests.decoder_checks import greedy
from tests.onnx_fixtures import caption_folder, entry_for, exporter_host, image_folder, text_folder

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STUDIO_ONNX_THREADS", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def host():
    return exporter_host()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_export_gate_manifest_and_greedy(tmp_path, host, family):
    from plugins.text.onnx import load_decoder, load_torch_model

    folder = text_folder(tmp_path / f"tiny-{family}", family)
    entry = entry_for(folder, family, "text")
    manifest = export_model(host, entry)
    out = folder / "onnx"
    assert manifest["folder"] == str(out) and (out / "onnx.json").is_file()
    assert json.loads((out / "onnx.json").read_text())["files"]["model.onnx"]["sha256"]
    assert manifest["parity_passed"] and manifest["parity"]["decoder_logits"]["max_abs_diff"] <= 1e-3
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime"} and manifest["opset"] >= 14
    io = {i["name"]: i["shape"] for i in manifest["graphs"]["decoder"]["inputs"]}
    assert io["input_ids"] == ["batch", "sequence"]
    assert io["past_key_values.0.key"][0] == "batch" and io["past_key_values.0.key"][2] == "past_sequence"
    assert entry.onnx == ["onnx"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folders left
    decoder, _ = load_decoder(folder, entry.hash)
    model = load_torch_model(folder, family)
    prompt = [[3, 5, 7, 11]]
    assert greedy(decoder.step, np.array(prompt), 24) == greedy(model.step, torch.tensor(prompt), 24)
    # batch 3 with a longer prompt also matches (dynamic batch and sequence axes)
    ids = np.random.default_rng(1).integers(0, 64, size=(3, 9))
    with torch.inference_mode():
        ref, _ = model(torch.from_numpy(ids))
    got, _ = decoder(ids)
    assert np.abs(got - ref.numpy()).max() < 1e-3


def test_int8_export_records_quality(tmp_path, host):
    folder = text_folder(tmp_path / "tiny-q", "llama")
    entry = entry_for(folder, "llama", "text")
    manifest = export_model(host, entry, quantize="int8")
    assert manifest["folder"].endswith("onnx-int8")
    q = manifest["quantization"]
    assert "MatMulNBits" in q["method"] and q["bits"] == 8 and "greedy_int8_matches_fp32_for_tokens" in q["quality"]
    assert manifest["parity"]["decoder_logits_int8"]["passed"] and "decoder_logits_int8" in q["gate"]
    assert "bpc_onnx_int8" in q["quality"] or q["quality"]["heldout"].startswith("not measured")
    if "bpc_onnx_int8" in q["quality"]:
        assert q["quality"]["top1_agreement_int8_vs_fp32"].split("/")[1].startswith("1000")
    assert sorted(p.name for p in (folder / "onnx-int8").iterdir() if p.is_file()) == [
        "config.json", "genai_config.json", "generation_config.json", "model.onnx", "model.onnx.data", "onnx.json",
        "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int4_export_is_gated_against_fp32(tmp_path, host, family):
    import onnx

    folder = text_folder(tmp_path / f"tiny-q4-{family}", family)
    manifest = export_model(host, entry_for(folder, family, "text"), quantize="int4")
    assert manifest["folder"].endswith("onnx-int4") and manifest["parity_passed"]
    q = manifest["quantization"]
    assert q["bits"] == 4 and q["block_size"] == 32 and "decoder_logits_int4" in q["gate"]
    gate = manifest["parity"]["decoder_logits_int4"]
    assert gate["passed"] and gate["top1_agreement"] >= gate["min_top1_agreement"]
    held = manifest["parity"]["heldout_text_int4"]  # the held-out text's agreement is judged by the same floor
    assert held["passed"] and held["top1_agreement"] >= 0.75 and " tokens of " in held["inputs"]
    assert gate["max_abs_diff"] <= gate["tolerance"] and gate["against"] == "the fp32 ONNX graph"
    graph = onnx.load(str(folder / "onnx-int4" / "model.onnx"))
    bits = {n.input[1]: a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}
    gathered = {n.input[0] for n in graph.graph.node if n.op_type == "Gather"}
    assert set(bits.values()) <= {4, 8} and 4 in bits.values()
    assert all(b == 4 or name in gathered for name, b in bits.items())  # 8 bits only for a tied embedding/head


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_exports_store_each_weight_once(tmp_path, host, family, scheme):
    """A tied embedding / output table is stored once, quantized: no fp32 copy for the Gather beside the head's
    quantized copy, and the weights file is the weights as stored plus page alignment."""
    import onnx
    from onnx import numpy_helper

    folder = text_folder(tmp_path / f"tiny-{scheme}-{family}", family)
    export_model(host, entry_for(folder, family, "text"), quantize=scheme)
    path = folder / f"onnx-{scheme}" / "model.onnx"
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tables = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert tables and not _tied(graph)  # the embedding reads the head's quantized table (or its own, untied)
    stored = sum(a.nbytes for a in inits.values())
    data = path.with_name("model.onnx.data").stat().st_size
    assert data <= stored + 4096 * len(inits)


def _tied(graph) -> set:
    """fp32 tables that a Gather reads and whose quantized copy a MatMulNBits reads (the duplication to avoid)."""
    q = {n.input[1][:-3] for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].endswith(("_Q8", "_Q4"))}
    return {n.input[0] for n in graph.node if n.op_type == "Gather"} & q


def _break_scales(path):
    """Scramble the scales of every MatMulNBits node: a quantized graph that runs but computes nonsense."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    scales = {n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits"}
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in scales:
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((arr * rng.normal(0, 3, arr.shape)).astype(arr.dtype), init.name))
    onnx.save(model, str(path))


@pytest.fixture
def broken_quantizer(monkeypatch):
    """Quantization that writes graphs with scrambled scales."""
    import engine.backends.common as common

    real = common.quantize_graph

    def broken(src, dst, scheme="int8"):
        real(src, dst, scheme)
        _break_scales(dst)

    monkeypatch.setattr(common, "quantize_graph", broken)


def test_broken_quantized_graph_is_refused(tmp_path, host, broken_quantizer):
    folder = text_folder(tmp_path / "tiny-qbad", "llama")
    entry = entry_for(folder, "llama", "text")
    with pytest.raises(ParityError, match="decoder_logits_int8 differs") as refused:
        export_model(host, entry, quantize="int8")
    assert "top-1 agreement" in refused.value.failures[0]
    assert not (folder / "onnx-int8").exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]
    said = []
    manifest = export_model(host, entry, quantize="int8", force=True, log=said.append)
    assert not manifest["parity_passed"] and manifest["parity"]["decoder_logits"]["passed"]
    assert manifest["parity"]["decoder_logits_int8"]["passed"] is False
    assert len([m for m in said if "decoder_logits_int8 differs" in m]) == 1  # each figure is judged once
    assert manifest["parity"]["heldout_text_int8"]["passed"] is False  # and on held-out text as well


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_image_quantized_graphs_are_gated_by_relative_error(tmp_path, host, scheme):
    folder = image_folder(tmp_path / f"tiny-img-{scheme}")
    manifest = export_model(host, entry_for(folder, "shapes-diffusion", "image"), quantize=scheme)
    for name in (f"text_encoder_{scheme}", f"unet_{scheme}"):
        gate = manifest["parity"][name]
        assert gate["passed"] and 0 < gate["relative_error"] <= gate["tolerance"], gate
        assert name in manifest["quantization"]["gate"]
    assert f"analyzer_cost_{scheme}" in manifest["quantization"]["quality"]


def test_broken_quantized_image_graph_is_refused(tmp_path, host, broken_quantizer):
    folder = image_folder(tmp_path / "tiny-img-bad")
    with pytest.raises(ParityError, match="_int8 differs"):
        export_model(host, entry_for(folder, "shapes-diffusion", "image"), quantize="int8")
    assert not (folder / "onnx-int8").exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_builtin_exports_go_to_studio_home(tmp_path, host):
    from engine.backends.runtime import export_folders

    folder = text_folder(tmp_path / "builtin" / "tiny-b", "gpt2")
    entry = entry_for(folder, "gpt2", "text", builtin=True)
    manifest = export_model(host, entry)
    assert manifest["folder"] == str(tmp_path / "home" / "exports" / "tiny-b" / "onnx")
    assert entry.onnx == [manifest["folder"]]
    assert [str(p) for p in export_folders(folder)] == [manifest["folder"]]
    assert manifest["used_by_backend"] is True
    elsewhere = export_model(host, entry, out_dir=tmp_path / "elsewhere")  # written, but never loaded from there
    assert elsewhere["used_by_backend"] is False and [str(p) for p in export_folders(folder)] == [manifest["folder"]]


def test_failed_gate_refused_and_nothing_left(tmp_path, host, monkeypatch):
    import plugins.text.onnx as text

    real = text.torch_stepper

    def perturbed(model):
        step = real(model)
        return lambda ids, cache: (lambda lc: (lc[0] + 0.5, lc[1]))(step(ids, cache))

    monkeypatch.setattr(text, "torch_stepper", perturbed)
    folder = text_folder(tmp_path / "tiny-bad", "llama")
    entry = entry_for(folder, "llama", "text")
    with pytest.raises(ParityError, match="does not match PyTorch.*0.5") as refused:
        export_model(host, entry)
    assert refused.value.failures and "decoder_logits" in refused.value.failures[0]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "studio.json",
                                                        "tokenizer.json"]
    builtin = entry_for(folder, "llama", "text", builtin=True)
    with pytest.raises(ModelError):
        export_model(host, builtin)
    assert not (tmp_path / "home" / "exports").exists()  # folders made for the export are removed again
    said = []
    manifest = export_model(host, entry, force=True, log=said.append)
    assert manifest["forced"] and not manifest["parity_passed"]
    assert len([m for m in said if "parity gate failed" in m]) == 1  # the host runs the gate once


def test_refusals(tmp_path, host):
    folder = text_folder(tmp_path / "tiny-r", "llama")
    entry = entry_for(folder, "llama", "text")
    entry.family = "no-such-family"
    with pytest.raises(UsageError, match="No ONNX exporter"):
        export_model(host, entry)
    entry.family = "llama"
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an earlier ONNX export"):
        export_model(host, entry, out_dir=other)
    assert (other / "keep.txt").read_text() == "mine"
    first = export_model(host, entry, out_dir=tmp_path / "exp")
    again = export_model(host, entry, out_dir=tmp_path / "exp")  # an earlier export is replaced
    assert first["folder"] == again["folder"] and len(list(tmp_path.glob(".exp*"))) == 0
    import os
    import socket

    here = socket.gethostname()
    dead = tmp_path / f".exp.partial-{here}~999999999-abc"  # an export killed mid-way (megabytes each) ...
    live = tmp_path / f".exp.partial-{here}~{os.getppid()}-def"  # ... and one still running
    for scratch in (dead, live):
        scratch.mkdir()
        (scratch / "model.onnx").write_bytes(b"x")
    export_model(host, entry, out_dir=tmp_path / "exp")
    assert not dead.exists() and live.exists()
    (tmp_path / "exp" / "runs").mkdir()  # a user's files in it were deleted with the earlier export
    (tmp_path / "exp" / "runs" / "r1.csv").write_text("data")
    (tmp_path / "exp" / "NOTES.txt").write_text("my notes")
    with pytest.raises(UsageError, match=r"did not write \(NOTES.txt, runs/r1.csv\)"):
        export_model(host, entry, out_dir=tmp_path / "exp")
    assert (tmp_path / "exp" / "NOTES.txt").read_text() == "my notes"
    # another model's export is not "an earlier export" of this one: it was replaced, and that model then failed
    other_entry = entry_for(text_folder(tmp_path / "tiny-b", "llama", seed=1), "llama", "text")
    with pytest.raises(UsageError, match="holds the ONNX export of model tiny-r, which a new export would replace"):
        export_model(host, other_entry, out_dir=first["folder"])
    from engine.backends.runtime import open_export

    with pytest.raises(ModelError, match="was made from model tiny-r; export this one again with `studio export-onnx"):
        open_export(other_entry.path, model_hash=other_entry.hash, export=Path(first["folder"]))


def test_caption_export_and_pipeline_parity(tmp_path, host):
    from PIL import Image

    from plugins.caption.pipeline import CaptionPipeline
    from engine.shapes import render, sample_scene

    folder = caption_folder(tmp_path / "tiny-cap")
    entry = entry_for(folder, "vision-encoder-decoder", "caption")
    manifest = export_model(host, entry)
    assert manifest["parity_passed"] and manifest["parity"]["greedy_captions"]["identical"] == "8/8"
    assert set(manifest["graphs"]) == {"encoder", "decoder", "encoder_model", "decoder_model", "decoder_with_past_model"}
    t = CaptionPipeline.from_folder(folder, backend="torch")
    o = CaptionPipeline.from_folder(folder, backend="onnx")
    rng = np.random.default_rng(3)
    for i in range(3):
        image = Image.fromarray(render(sample_scene(rng), 32))
        for beams in (1, 3):
            a, b = t(image, 12, beams), o(image, 12, beams)
            assert a.token_ids == b.token_ids and a.text == b.text
    CaptionPipeline.from_folder(folder, backend="onnx", model_hash=entry.hash)  # the export's own model: fine
    with pytest.raises(ModelError, match="another version"):  # the model changed after the export
        CaptionPipeline.from_folder(folder, backend="onnx", model_hash="0" * 64)


def test_caption_int8_is_gated_against_fp32(tmp_path, host):
    folder = caption_folder(tmp_path / "tiny-cap8")
    manifest = export_model(host, entry_for(folder, "vision-encoder-decoder", "caption"), quantize="int8")
    gate = manifest["parity"]["decoder_logits_int8"]
    assert gate["passed"] and "renders" in gate["against"] and gate["top1_agreement"] >= 0.9
    assert "decoder_logits_int8" in manifest["quantization"]["gate"] and manifest["parity"]["encoder_int8"]["passed"]
    assert "exact_match_onnx_int8" in manifest["quantization"]["quality"]


def test_image_export_unet_within_tolerance(tmp_path, host):
    from plugins.image.model import load
    from plugins.image.onnx import load_image_model

    folder = image_folder(tmp_path / "tiny-img")
    entry = entry_for(folder, "shapes-diffusion", "image")
    manifest = export_model(host, entry)
    assert manifest["parity_passed"] and set(manifest["graphs"]) == {"text_encoder", "unet"}
    assert manifest["parity"]["unet"]["max_abs_diff"] <= 1e-3
    assert manifest["parity"]["sampled_images"]["analyzer_agrees"] == "2/2"
    shapes = {i["name"]: i["shape"] for i in manifest["graphs"]["unet"]["inputs"]}
    assert shapes["sample"] == ["batch", 5, "height", "width"] and shapes["timestep"] == ["batch"]
    # the U-Net at a batch size and timesteps other than the export's example
    onnx_model = load_image_model(folder, entry.hash)
    torch_model = load(folder)
    x = np.random.default_rng(4).standard_normal((3, 5, 16, 16)).astype(np.float32)
    h = np.random.default_rng(5).standard_normal((3, 16, 16)).astype(np.float32)
    p = np.random.default_rng(6).standard_normal((3, 16)).astype(np.float32)
    for t in (999.0, 250.0, 3.0):
        with torch.no_grad():
            ref = torch_model.unet(torch.from_numpy(x), torch.full((3,), t), torch.from_numpy(h),
                                   torch.from_numpy(p)).numpy()
        assert np.abs(onnx_model.unet(x, t, h, p) - ref).max() < 1e-3


def test_export_of_a_folder_used_in_place_needs_out(tmp_path, studio_home, capsys):
    """`studio export-onnx /my/folder` wrote an onnx/ folder into the user's own model folder, unasked."""
    from studio.cli import main

    folder = text_folder(tmp_path / "mine", "llama")
    before = sorted(p.name for p in folder.iterdir())
    assert main(["export-onnx", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not in the model store" in err and f"--out {folder / 'onnx'}" in err
    assert sorted(p.name for p in folder.iterdir()) == before


PARITY = {"decoder_logits": {"max_abs_diff": 1.53e-05, "tolerance": 0.001, "passed": True, "greedy_agreement": "12/12",
                             "max_abs_logit": 14.87, "inputs": "batch 2, prompt 7 tokens"},
          "unet_int8": {"against": "the fp32 ONNX graph", "scheme": "int8", "relative_error": 0.09,
                        "max_abs_diff": 0.09, "tolerance": 0.05, "passed": False, "inputs": "3 prompts"},
          "sampled_images": {"max_abs_diff": 1.0, "tolerance": 4.0, "passed": True, "units": "pixel levels 0-255"}}


def test_parity_figures_print_as_readable_lines(studio_home, capsys, monkeypatch):
    """`studio export-onnx` printed each check as a Python dict; --json keeps the manifest as it is."""
    import engine.onnx_export
    from studio.cli import main

    manifest = {"folder": "/x/onnx", "parity": PARITY, "parity_passed": False}
    monkeypatch.setattr(engine.onnx_export, "export_model", lambda *a, **kw: manifest)
    assert main(["export-onnx", "shakespeare-llama"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "parity decoder_logits: passed, max difference 1.53e-05 (tolerance 0.001), greedy agreement 12/12; "
        "against PyTorch, on batch 2, prompt 7 tokens",
        "parity unet_int8: FAILED, relative error 0.09 (tolerance 0.05); against the fp32 ONNX graph, on 3 prompts",
        "parity sampled_images: passed, max difference 1 (tolerance 4; pixel levels 0-255); against PyTorch"]
    assert main(["export-onnx", "shakespeare-llama", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == manifest
