"""Stable Diffusion against diffusers (issue #14) on tiny random pipelines saved by diffusers: text to image,
img2img and inpainting (the 9-channel U-Net and masked blending), SD 1.x and SD 2.x v-prediction, five samplers,
fp16 and sharded folders; images within 1e-3 per pixel of StableDiffusion(Img2Img|Inpaint)Pipeline."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from engine.diffusion import SampleSettings  # noqa: E402
from sd_fixtures import save_pipeline  # noqa: E402

SIZE = 32
SAMPLERS = {"ddim": lambda c: diffusers.DDIMScheduler.from_config(c),
            "euler": lambda c: diffusers.EulerDiscreteScheduler.from_config(c),
            "euler_a": lambda c: diffusers.EulerAncestralDiscreteScheduler.from_config(c),
            "dpmpp_2m": lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c),
            "dpmpp_2m_karras": lambda c: diffusers.DPMSolverMultistepScheduler.from_config(c, use_karras_sigmas=True)}
_CACHE = {}


def studio_model(tmp_path_factory, variant="sd1", **kw):
    """(diffusers pipeline, the studio's loaded model of the same folder), made once per variant."""
    key = (variant, tuple(sorted(kw.items())))
    if key not in _CACHE:
        from plugins.stable_diffusion.folder import convert
        from plugins.stable_diffusion.model import load

        root = tmp_path_factory.mktemp(f"sd-{variant}")
        pipe = save_pipeline(root / "pipe", variant, **kw)
        (root / "studio").mkdir()
        convert(root / "pipe", root / "studio")
        pipe.saved_scheduler = json.loads((root / "pipe" / "scheduler" / "scheduler_config.json").read_text())
        _CACHE[key] = (pipe, load(root / "studio"))
    return _CACHE[key]


def ours(sd, settings, seed=3, prompt="a red cat", negative="a dog", **kw):
    from plugins.stable_diffusion.pipeline import decode, sample

    latents = None
    for _, _, latents in sample(sd, prompt, negative, settings, seed, SIZE, SIZE, **kw):
        pass
    return (decode(sd, latents).transpose(0, 2, 3, 1) + 1) / 2


def reference(pipe_cls, pipe, sampler, steps=4, guidance=7.5, seed=3, **kw):
    p = pipe_cls(**pipe.components)
    p.scheduler = SAMPLERS[sampler](pipe.saved_scheduler)  # as from_pretrained reads it from the folder
    p.set_progress_bar_config(disable=True)
    return p(["a red cat"], negative_prompt=["a dog"], num_inference_steps=steps, guidance_scale=guidance,
             height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def scene():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_text_to_image_matches_diffusers(tmp_path_factory, sampler, variant):
    pipe, sd = studio_model(tmp_path_factory, variant)
    want = reference(diffusers.StableDiffusionPipeline, pipe, sampler)
    got = ours(sd, SampleSettings(4, 7.5, sampler))
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m_karras"])
def test_img2img_matches_diffusers(tmp_path_factory, sampler):
    pipe, sd = studio_model(tmp_path_factory)
    image, _ = scene()
    want = reference(diffusers.StableDiffusionImg2ImgPipeline, pipe, sampler, steps=6, image=image, strength=0.6)
    got = ours(sd, SampleSettings(6, 7.5, sampler), image=image, strength=0.6)
    assert np.abs(got - want).max() < 1e-3


def test_img2img_at_a_strength_that_leaves_no_step_keeps_the_image_with_every_sampler(tmp_path_factory):
    """ddim and ddpm failed with 'IndexError: index 6 is out of bounds' when int(steps x strength) was 0 (strength
    0, or 0.1 with 6 steps); the sigma samplers gave the image back through the VAE, as they all do now."""
    pipe, sd = studio_model(tmp_path_factory)
    image, _ = scene()
    kept = [ours(sd, SampleSettings(6, 7.5, s), image=image, strength=strength)
            for s in ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m") for strength in (0.0, 0.1)]
    assert all(np.array_equal(k, kept[0]) for k in kept)


@pytest.mark.parametrize("variant,strength", [("inpaint", 1.0), ("inpaint", 0.7), ("sd1", 1.0)])
def test_inpainting_matches_diffusers(tmp_path_factory, variant, strength):
    pipe, sd = studio_model(tmp_path_factory, variant)
    assert sd.inpainting == (variant == "inpaint")
    image, mask = scene()
    want = reference(diffusers.StableDiffusionInpaintPipeline, pipe, "euler_a", steps=5, image=image,
                     mask_image=mask, strength=strength)
    got = ours(sd, SampleSettings(5, 7.5, "euler_a"), image=image, mask=mask, strength=strength)
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("kw", [{"fp16": True}, {"shard": "100KB"}])
def test_fp16_and_sharded_folders(tmp_path_factory, kw):
    pipe, sd = studio_model(tmp_path_factory, "sd1", **kw)
    if kw.get("fp16"):  # the studio computes in fp32 from the fp16 weights; so does the reference, upcast
        pipe = pipe.to(torch.float32)
    want = reference(diffusers.StableDiffusionPipeline, pipe, "ddim")
    assert np.abs(ours(sd, SampleSettings(4, 7.5, "ddim")) - want).max() < 1e-3


def test_import_generate_replay_and_refusals(tmp_path, studio_home):
    """`studio models import` of a diffusers folder, then txt2img / img2img / inpainting through the runner, a
    replay that gives the same picture, and one-line refusals of what cannot be imported."""
    import subprocess
    import sys

    from engine.errors import ModelError, UsageError
    from engine.plugins import PluginHost
    from engine.replay import replay
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    save_pipeline(tmp_path / "tiny-sd", "sd1")
    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host)
    entry = store.import_(tmp_path / "tiny-sd")
    assert entry.family == "stable-diffusion" and entry.generator == "sd" and entry.config["in_channels"] == 4
    image, mask = scene()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    base = dict(model="tiny-sd", prompt="a red cat", seed=5, options={"width": 32, "height": 32, "steps": 3,
                                                                        "sampler": "euler_a"})
    for extra, mode in (({}, "txt2img"), ({"image": str(tmp_path / "in.png")}, "img2img"),
                        ({"image": str(tmp_path / "in.png"), "mask": str(tmp_path / "mask.png")}, "inpaint")):
        record = execute(prepare(host, store, Job("sd", **base, **extra)))
        assert record.result.image.size == (32, 32) and record.result.info["mode"] == mode
    assert not record.result.warnings  # the input has the output's shape
    again, same, _ = replay(host, store, record.recipe)
    assert same  # the inpainting recipe (image and mask kept by content) replays to the same picture
    image.resize((48, 32)).save(tmp_path / "wide.png")  # another shape: squashed to 32 x 32, and said so
    wide = execute(prepare(host, store, Job("sd", **base, image=str(tmp_path / "wide.png"))), history=False)
    assert any("The input image is 48x32; it was resized to 32x32" in w for w in wide.result.warnings)
    with pytest.raises(UsageError, match="multiple of 8"):
        prepare_and_run = execute(prepare(host, store, Job("sd", model="tiny-sd", options={"width": 30})))
        del prepare_and_run
    # refusals, each one line, nothing imported half
    (tmp_path / "no-unet").mkdir()
    (tmp_path / "no-unet" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelError, match="has no unet/ folder"):
        store.import_(tmp_path / "no-unet")
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ModelError, match="SDXL pipeline"):
        store.import_(tmp_path / "xl")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="does not hold a JSON object"):
        store.import_(tmp_path / "listed")
    import shutil

    shutil.copytree(tmp_path / "tiny-sd", tmp_path / "x0")
    sched = tmp_path / "x0" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "sample"}))
    with pytest.raises(ModelError, match="prediction_type 'sample' is not supported"):  # was: every generation
        store.import_(tmp_path / "x0")
    assert [e.name for e in store.list() if not e.builtin] == ["tiny-sd"]
    cli = subprocess.run([sys.executable, "-m", "studio.cli", "generate", "sd", "--model", "tiny-sd", "--prompt",
                          "a cat", "--set", "width=32", "--set", "height=32", "--set", "steps=2", "--image",
                          str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.splitlines()[-1])["path"].endswith(".png")


def test_inputs_are_read_as_the_studio_reads_images(tmp_path, studio_home):
    """Stable Diffusion reads its input image and mask as every image the studio reads (engine.images): a
    transparent input is drawn on white (PIL's plain convert made it black where it was clear), strokes painted on a
    transparent layer are the mask (their alpha), and a photo's EXIF orientation is applied."""
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    save_pipeline(tmp_path / "tiny-sd", "sd1")
    host = PluginHost(safe_mode=True, disabled=[]).load()
    store = ModelStore(host)
    store.import_(tmp_path / "tiny-sd")
    image, mask = scene()
    clear = image.convert("RGBA")
    clear.putalpha(Image.fromarray(np.where(np.asarray(mask) > 0, 0, 255).astype(np.uint8)))  # a hole
    on_white = Image.alpha_composite(Image.new("RGBA", clear.size, (255, 255, 255, 255)), clear).convert("RGB")
    strokes = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), mask=mask)
    for name, im in (("clear.png", clear), ("on_white.png", on_white), ("mask.png", mask),
                     ("strokes.png", strokes)):
        im.save(tmp_path / name)

    def picture(image, mask):
        job = Job("sd", model="tiny-sd", prompt="a red cat", seed=5, image=str(tmp_path / image),
                  mask=str(tmp_path / mask), options={"width": 32, "height": 32, "steps": 2, "sampler": "ddim"})
        return np.asarray(execute(prepare(host, store, job)).result.image)

    want = picture("on_white.png", "mask.png")
    assert np.array_equal(picture("clear.png", "mask.png"), want)
    assert np.array_equal(picture("on_white.png", "strokes.png"), want)
    # keep_unmasked (A1111's overlay): the input exactly where the mask is black, the output where it is white,
    # blended by a blurred mask's grey (before, the kept region was the VAE's reconstruction of the input)
    from PIL import ImageFilter

    soft = mask.convert("L").filter(ImageFilter.GaussianBlur(2))
    soft.save(tmp_path / "soft.png")
    job = Job("sd", model="tiny-sd", prompt="a red cat", seed=5, image=str(tmp_path / "on_white.png"),
              mask=str(tmp_path / "soft.png"), options={"width": 32, "height": 32, "steps": 2, "sampler": "ddim",
                                                        "keep_unmasked": True})
    kept = np.asarray(execute(prepare(host, store, job)).result.image).astype(int)
    plain = picture("on_white.png", "soft.png").astype(int)
    m = np.asarray(soft)[..., None] / 255.0
    source = np.asarray(on_white.convert("RGB")).astype(int)
    assert np.abs(kept - (plain * m + source * (1 - m))).max() <= 1
    assert np.array_equal(kept[np.asarray(soft) == 0], source[np.asarray(soft) == 0])
    assert not np.array_equal(plain[np.asarray(soft) == 0], source[np.asarray(soft) == 0])


def _kohya_file(path, unet, text, rng):
    """A kohya-format LoRA on some U-Net attention and feed-forward layers and a 1x1-convolution proj_in (the keys
    AUTOMATIC1111 and kohya's trainer write)."""
    from safetensors.torch import save_file

    tensors = {}

    def add(prefix, path, w, rank=4, alpha=2.0):
        key = prefix + path.replace(".", "_")
        out, inp = w.shape[0], w.shape[1]
        down = torch.from_numpy(rng.standard_normal((rank, inp)).astype(np.float32) * 0.3)
        up = torch.from_numpy(rng.standard_normal((out, rank)).astype(np.float32) * 0.3)
        if w.dim() == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                        key + ".alpha": torch.tensor(alpha)})

    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2", "proj_in")):
            add("lora_unet_", name, module.weight)
    save_file(tensors, str(path))


def test_lora_files_match_diffusers(tmp_path):
    """A kohya LoRA (with a 1x1-convolution layer) and a diffusers/PEFT LoRA on the U-Net and the text encoder,
    each at weight 0.8 and both at once, give diffusers' load_lora_weights images within 1e-3. The diffusers file
    has lora_alpha != r, which only its header's lora_adapter_metadata says (it was applied at scale 1, 255 levels
    off), and is also given as its folder, as load_lora_weights takes it (it was 'does not exist')."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from plugins.stable_diffusion.folder import convert
    from plugins.stable_diffusion.model import load

    pipe = save_pipeline(tmp_path / "pipe", "sd1")
    (tmp_path / "studio").mkdir()
    convert(tmp_path / "pipe", tmp_path / "studio")
    rng = np.random.default_rng(0)
    kohya = tmp_path / "style.safetensors"
    _kohya_file(kohya, pipe.unet, pipe.text_encoder, rng)
    unet_cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["to_k", "to_v", "proj_out"])
    text_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    pipe.unet.add_adapter(unet_cfg)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(text_cfg, pipe.text_encoder)
    with torch.no_grad():
        for name, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=text_cfg.to_dict())
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    for files in ([kohya], [peft_file], [kohya, tmp_path / "peft"]):
        ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
        ref.saved_scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
        for i, f in enumerate(files):
            ref.load_lora_weights(str(f), adapter_name=f"a{i}")
        ref.set_adapters([f"a{i}" for i in range(len(files))], adapter_weights=[0.8] * len(files))
        want = reference(diffusers.StableDiffusionPipeline, ref, "ddim")
        sd = load(tmp_path / "studio")
        apply_adapters({"unet": sd.unet, "text_encoder": sd.text_encoder},
                       [AdapterRef(f.name, f, "", 0.8) for f in files])
        got = ours(sd, SampleSettings(4, 7.5, "ddim"))
        base = ours(load(tmp_path / "studio"), SampleSettings(4, 7.5, "ddim"))
        assert np.abs(got - want).max() < 1e-3 and np.abs(got - base).max() > 1e-2, [f.name for f in files]


def test_lora_for_another_model_is_refused(tmp_path, tmp_path_factory):
    from safetensors.torch import save_file

    from engine.errors import UsageError
    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters

    _, sd = studio_model(tmp_path_factory, "sd2-v")
    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
               torch.zeros(4, 320), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
               ".lora_up.weight": torch.zeros(320, 4)}, str(bad))
    with pytest.raises(UsageError, match="attn1.to_q|another base model"):
        apply_adapters({"unet": sd.unet, "text_encoder": sd.text_encoder}, [AdapterRef("o", bad, "", 1.0)])


def test_empty_prompt_warns_as_the_image_generator_does(tmp_path_factory):
    from engine.generators import Result
    from plugins.stable_diffusion.pipeline import run

    _, sd = studio_model(tmp_path_factory)
    opts = {"width": 32, "height": 32, "steps": 1, "guidance": 1.0, "sampler": "euler"}
    result = [e for e in run(sd, "", opts, 0) if isinstance(e, Result)][0]
    assert result.warnings == ["The prompt is empty, so the image is unconditional (any scene the model likes)."]
    assert not [e for e in run(sd, "a cat", opts, 0) if isinstance(e, Result)][0].warnings
