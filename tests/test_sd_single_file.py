"""Single-file Stable Diffusion checkpoints (issue #14 item 1): a tiny diffusers pipeline written with the original
LDM key names (SD 1.x CLIP, SD 2.x OpenCLIP, inpainting), which diffusers' own from_single_file reads back to the
pipeline's weights; the studio's conversion must give weights identical to the diffusers folder, and generate."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from sd_fixtures import save_pipeline, to_ldm  # noqa: E402


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "inpaint"])
def test_single_file_gives_the_folder_weights(tmp_path, variant):
    from plugins.stable_diffusion.layout import split
    from plugins.stable_diffusion.single_file import convert, detect

    pipe = save_pipeline(tmp_path / "pipe", variant)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(pipe, openclip=variant.startswith("sd2")).items()}, str(ckpt))
    assert detect(ckpt) and not detect(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "out").mkdir()
    convert(ckpt, tmp_path / "out", vocab_dir=tmp_path / ".pipe-tok")
    got = split(load_file(str(tmp_path / "out" / "model.safetensors")))
    want = {"unet": pipe.unet.state_dict(), "vae": pipe.vae.state_dict(),
            "text_encoder": {k[len("text_model."):] if k.startswith("text_model.") else k: v
                             for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}}
    got["text_encoder"] = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                           for k, v in got["text_encoder"].items()}
    for part in want:
        assert set(got[part]) == set(want[part]), (part, sorted(set(got[part]) ^ set(want[part]))[:5])
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), (part, k)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["in_channels"] == (9 if variant == "inpaint" else 4)
    assert cfg["prediction_type"] == ("v_prediction" if variant == "sd2-v" else "epsilon")
    assert cfg["unet"]["use_linear_projection"] == variant.startswith("sd2")
    assert len(cfg["autov2"]) == 10


def test_diffusers_reads_the_test_checkpoint(tmp_path):
    """The LDM file the tests write is a real one: diffusers' own single-file loader gives the same weights."""
    pipe = save_pipeline(tmp_path / "pipe", "sd1")
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm(pipe).items()}, str(ckpt))
    try:
        ref = diffusers.StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tmp_path / "pipe"),
                                                                 local_files_only=True, safety_checker=None)
    except Exception as exc:  # noqa: BLE001 - diffusers may need files it cannot fetch offline
        pytest.skip(f"diffusers' from_single_file does not run offline here: {exc}")
    for name in ("unet", "vae"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_import_refusals_and_generation(tmp_path, studio_home):
    from engine.errors import ModelError
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    from plugins.stable_diffusion.single_file import clip_vocabulary

    pipe = save_pipeline(tmp_path / "pipe", "sd1", vocab_dir=clip_vocabulary(tmp_path / "clip"))  # CLIP's own
    ldm = to_ldm(pipe)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "dreamy.safetensors"))
    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host)
    entry = store.import_(tmp_path / "dreamy.safetensors")
    assert entry.name == "dreamy" and entry.family == "stable-diffusion"
    assert entry.config["source_format"] == "ldm-single-file" and entry.config["autov2"]
    record = execute(prepare(host, store, Job("sd", model="dreamy", prompt="a cat", seed=1,
                                              options={"width": 32, "height": 32, "steps": 2})))
    assert record.result.image.size == (32, 32)
    xl = {"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1), **ldm}
    save_file({k: v.contiguous() for k, v in xl.items()}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ModelError, match="SDXL"):
        store.import_(tmp_path / "xl.safetensors")
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    save_file({k: v.contiguous() for k, v in no_vae.items()}, str(tmp_path / "novae.safetensors"))
    with pytest.raises(ModelError, match="first_stage_model"):
        store.import_(tmp_path / "novae.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="--trust"):
        store.import_(tmp_path / "old.ckpt")
    data = (tmp_path / "dreamy.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # a truncated file is not recognised, or refused: never imported
        store.import_(tmp_path / "cut.safetensors")
    assert [e.name for e in store.list() if not e.builtin] == ["dreamy"]
