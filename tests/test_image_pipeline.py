"""The text-to-image pipeline and plugin on a tiny random model: events, determinism, cancel, warnings, errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.errors import CancelledError, ModelError, UsageError
from engine.generators import Context, ModelRef, Partial, Progress, Request, Result
from plugins.image import model as M
from plugins.image.tokenizer import shapes_tokenizer
from plugins.image.train import default_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-image")
    config = default_config(channels=(8, 16), text_dim=16, text_layers=1, heads=2, size=16)
    unet, text = M.build(M.ImageModelConfig.from_dict(config))
    M.save(path, config, unet, text, shapes_tokenizer(), {"generator": "image", "family": "shapes-diffusion"})
    return path


def request(folder, prompt="a small red circle in the center on a blue background", seed=1, **options):
    import plugins.image as plugin
    opts = plugin.INFO.resolve_options(options)
    ref = ModelRef(name="tiny", path=folder, family="shapes-diffusion", hash="tinyhash",
                   config=json.loads((folder / "config.json").read_text()))
    return Request(prompt=prompt, options=opts, seed=seed, model=ref)


def run(folder, context=None, **kw):
    import plugins.image as plugin
    return list(plugin.generate(request(folder, **kw), context or Context()))


def test_events_and_result(folder):
    events = run(folder, steps=8)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == list(range(9)) and progress[-1].total == 8
    assert any(isinstance(e, Partial) and e.image is not None for e in events)
    result = events[-1]
    assert isinstance(result, Result) and result.image.mode == "RGB" and result.image.size == (16, 16)
    assert result.warnings == [] and result.info["sampler"] == "dpmpp_2m"


def test_seed_determinism(folder):
    a = np.asarray(run(folder, seed=5, steps=4)[-1].image)
    b = np.asarray(run(folder, seed=5, steps=4)[-1].image)
    c = np.asarray(run(folder, seed=6, steps=4)[-1].image)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_every_sampler(folder, sampler):
    result = run(folder, steps=5, sampler=sampler, guidance=2.0, negative_prompt="a red background")[-1]
    assert np.asarray(result.image).shape == (16, 16, 3)


def test_cancel_between_steps(folder):
    import plugins.image as plugin
    ctx = Context()
    gen = plugin.generate(request(folder, steps=10), ctx)
    seen = []
    with pytest.raises(CancelledError):
        for event in gen:
            seen.append(event)
            if isinstance(event, Progress) and event.step == 2:
                ctx.cancel.cancel()
    assert max(e.step for e in seen if isinstance(e, Progress)) == 2  # no further step runs


def test_warnings(folder):
    r = run(folder, prompt="a small vermilion circle", steps=2)[-1]
    assert any("vermilion" in w for w in r.warnings)
    r = run(folder, prompt="", steps=2)[-1]
    assert any("empty" in w for w in r.warnings)
    r = run(folder, prompt=" ".join(["red"] * 30), steps=2)[-1]
    assert any("cut" in w for w in r.warnings) and r.info["truncated_words"] == 16


def test_model_is_cached(folder):
    ctx = Context()
    run(folder, context=ctx, steps=1)
    run(folder, context=ctx, steps=1)
    assert len(ctx.cache) == 1


def test_onnx_backend_refused(folder):
    import plugins.image as plugin
    req = request(folder)
    req.backend = "onnx"
    with pytest.raises(UsageError):
        list(plugin.generate(req, Context()))


def _copy(folder, tmp_path):
    import shutil
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


def test_check_accepts_good_folder(folder):
    _image_architecture().verify(folder)


@pytest.mark.parametrize("damage", ["no_config", "bad_type", "missing_tensor", "wrong_shape", "bad_tokenizer",
                                    "no_weights", "corrupt_weights", "bad_unet_option"])
def test_bad_folder_raises_model_error(folder, tmp_path, damage):
    from safetensors.torch import load_file, save_file
    d = _copy(folder, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    if damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "bad_type":
        cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "bad_unet_option":
        cfg["unet"]["resnet_time_scale_shift"] = "ada_group"
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage in ("missing_tensor", "wrong_shape"):
        sd = load_file(str(d / "model.safetensors"))
        if damage == "missing_tensor":
            sd.pop("unet.conv_in.weight")
        else:
            sd["text_encoder.final_layer_norm.weight"] = torch.zeros(3, dtype=torch.float16)
        save_file(sd, str(d / "model.safetensors"))
    elif damage == "bad_tokenizer":
        (d / "tokenizer.json").write_text("{not json")
    elif damage == "no_weights":
        (d / "model.safetensors").unlink()
    elif damage == "corrupt_weights":
        (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError) as info:
        _image_architecture().verify(d)
    assert str(info.value).strip() and "\n" not in str(info.value)


def test_plugin_import_does_not_import_torch():
    code = "import sys, plugins.image as p; p.INFO; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**40 + 3])
def test_torch_noise_replica_matches_torch_randn(seed):
    from engine.diffusion.torch_noise import TorchRandn

    g, r = torch.Generator().manual_seed(seed), TorchRandn(seed)
    for shape in [(1, 3, 32, 32), (2, 3, 16, 16), (5, 7)]:  # successive draws follow the same stream
        want = torch.randn(shape, generator=g).numpy()
        assert np.abs(r.standard_normal(shape) - want).max() < 2e-6


def _image_architecture():
    """The shapes family's Architecture as the host registers it (its ``verify`` is what the store runs)."""
    from engine.plugins import PluginHost

    return PluginHost(safe_mode=True, disabled=[]).load().architectures["shapes-diffusion"][0]


def test_an_image_of_nan_is_an_error_not_a_black_picture():
    """A model or LoRA with NaN weights gave an all-black PNG, exit 0 and a history row (text refused NaN)."""
    import numpy as np
    import pytest

    from engine.diffusion import to_uint8
    from engine.errors import ModelError

    x = np.zeros((1, 3, 4, 4), np.float32)
    assert to_uint8(x).shape == (1, 4, 4, 3)
    x[0, 1, 2, 3] = np.nan
    with pytest.raises(ModelError, match="computed NaN"):
        to_uint8(x)
