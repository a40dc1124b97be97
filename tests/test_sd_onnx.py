"""Stable Diffusion on ONNX (issue #14 item 7): the export in Optimum's folder layout, gated against torch, opened
by diffusers' own ONNX pipeline with the same image, and the studio's onnxruntime backend running text to image,
img2img and inpainting with torch blocked, on the torch backend's pictures."""
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sd_fixtures import save_pipeline  # noqa: E402
from test_onnx_notorch import run_without_torch  # noqa: E402

_CACHE = {}


def exported(tmp_path_factory, variant="sd1"):
    """(host, store, entry, export folder, the diffusers pipeline) for a tiny pipeline imported and exported once."""
    if variant not in _CACHE:
        from engine.onnx_export import export_model
        from engine.plugins import PluginHost
        from engine.store import ModelStore

        root = tmp_path_factory.mktemp(f"sd-onnx-{variant}")
        pipe = save_pipeline(root / f"tiny-{variant}", variant)
        host = PluginHost(safe_mode=True, disabled=[]).load()
        store = ModelStore(host, builtin_dir=root / "none", user_dir=root / "models")
        entry = store.import_(root / f"tiny-{variant}")
        manifest = export_model(host, entry)
        _CACHE[variant] = (host, store, entry, manifest, pipe, root)
    return _CACHE[variant]


def test_export_layout_and_gate(tmp_path_factory):
    _, _, entry, manifest, _, _ = exported(tmp_path_factory)
    out = entry.path / "onnx"
    assert manifest["folder"] == str(out) and manifest["parity_passed"]
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert (out / name / "model.onnx").is_file() and (out / name / "config.json").is_file()
        assert manifest["graphs"][name]["file"] == f"{name}/model.onnx"
        assert manifest["parity"][name]["passed"], manifest["parity"][name]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "OnnxRuntimeModel"] and index["tokenizer"][1] == "CLIPTokenizer"
    assert manifest["parity"]["sampled_images"]["max_abs_diff"] <= 1
    assert "unet/model.onnx.data" in manifest["files"]  # weights beside each graph, hashed in the manifest
    unet = manifest["graphs"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o["name"] for o in unet["outputs"]] == ["out_sample"]


def test_diffusers_onnx_pipeline_opens_the_export(tmp_path_factory):
    """diffusers' OnnxStableDiffusionPipeline loads the folder as written and draws the studio's picture."""
    from engine.diffusion import SampleSettings
    from plugins.stable_diffusion.onnx import load_onnx
    from plugins.stable_diffusion.pipeline import decode, sample

    _, _, entry, _, pipe, _ = exported(tmp_path_factory)
    onnx_pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(entry.path / "onnx"),
                                                                      provider="CPUExecutionProvider")
    onnx_pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    onnx_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7)).numpy()
    # diffusers' ONNX pipeline assumes a VAE factor of 8 (the tiny VAE's is 2): 128 there sizes the same latents
    want = onnx_pipe("a red cat", negative_prompt="a dog", num_inference_steps=4, guidance_scale=7.5, height=128,
                     width=128, latents=latents, output_type="np").images
    nets = load_onnx(entry.path, entry.hash)
    for _, _, z in sample(nets, "a red cat", "a dog", SampleSettings(4, 7.5, "ddim"), 7, 32, 32):
        pass
    got = (decode(nets, z).transpose(0, 2, 3, 1) + 1) / 2
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("variant", ["sd1", "inpaint"])
def test_onnx_backend_without_torch_matches_torch(tmp_path_factory, variant):
    """The three modes on onnxruntime in a process where importing torch fails, against the torch backend."""
    from engine.runner import Job, execute, prepare
    from test_sd_pipeline import scene

    host, store, entry, _, _, root = exported(tmp_path_factory, variant)
    image, mask = scene()
    image.save(root / "in.png")
    mask.save(root / "mask.png")
    base = {"model": entry.name, "prompt": "a red cat", "options": {"width": 32, "height": 32, "steps": 3,
                                                                     "sampler": "euler_a", "strength": 0.7}}
    modes = [{}, {"image": str(root / "in.png")}, {"image": str(root / "in.png"), "mask": str(root / "mask.png")}]
    jobs = [{"plugin": "plugins.stable_diffusion", "generator": "sd", **base, **m} for m in modes]
    got = run_without_torch([dict(j) for j in jobs], root / "models")
    for job, result in zip(jobs, got):
        job.pop("plugin")
        record = execute(prepare(host, store, Job(backend="torch", seed=5, **job)), history=False)
        want = np.asarray(record.result.image, dtype=np.int16)
        have = np.frombuffer(bytes.fromhex(result["image"]), np.uint8).reshape(want.shape)
        assert np.abs(have - want).max() <= 1, job


def test_int8_unet_is_gated(tmp_path_factory, tmp_path):
    from engine.onnx_export import export_model

    host, _, entry, _, _, _ = exported(tmp_path_factory)
    manifest = export_model(host, entry, out_dir=tmp_path / "int8", quantize="int8")
    assert manifest["parity"]["unet_int8"]["passed"] and manifest["quantization"]["graphs"] == ["unet"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8" / "unet" / "model.onnx"),
                                        load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    assert sorted(p.name for p in (tmp_path / "int8" / "unet").iterdir()) == ["config.json", "model.onnx",
                                                                               "model.onnx.data"]
