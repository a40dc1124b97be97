"""Built-in plugin: Stable Diffusion 1.x and 2.x from the checkpoints people have (a diffusers pipeline folder),
with text to image, img2img and inpainting in one generator, ``sd``.

No torch at import: the model loads at the first generation and is cached by the host's context.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import hookimpl
from engine.architectures import Architecture, Importer
from engine.errors import UsageError
from engine.generators import Generator, GeneratorInfo, Option, finetuner, lazy, timed
from engine.samplers import SAMPLERS
from plugins.stable_diffusion.layout import MODEL_TYPE


INFO = GeneratorInfo(
    id="sd",
    title="Stable Diffusion",
    description="Draw an image from a prompt with a Stable Diffusion checkpoint; give an input image to change it "
                "(img2img) and paint a mask to redraw part of it (inpainting).",
    takes=("text", "image", "mask"),
    makes="image",
    image_required=False,
    prompt_required=False,
    options=(
        Option("width", "int", 0, "Width in pixels, a multiple of 8 (0: the model's own size, 512 for SD 1.x, 768 "
               "for SD 2.x v-prediction)", min=0, max=2048),
        Option("height", "int", 0, "Height in pixels, a multiple of 8 (0: the model's own size)", min=0, max=2048),
        Option("steps", "int", 25, "Denoising steps", min=1, max=200),
        Option("guidance", "float", 7.5, "CFG scale: how closely to follow the prompt (1 = not at all)", min=0.0,
               max=30.0),
        Option("sampler", "str", "dpmpp_2m_karras", "Sampler: dpmpp_2m_karras (A1111's DPM++ 2M Karras), "
               "euler_a (Euler a), euler, dpmpp_2m, ddim or ddpm", choices=SAMPLERS),
        Option("negative_prompt", "str", "", "What to steer away from"),
        Option("strength", "float", 0.75, "With an input image: how much to change it (0 = keep, 1 = redraw)",
               min=0.0, max=1.0),
        Option("keep_unmasked", "bool", False, "With a mask: put the input's own pixels back outside it (blended "
               "along a soft mask's edge), as AUTOMATIC1111 does; off: the model's output everywhere, as diffusers"),
    ),
    families=("stable-diffusion",),
    takes_lora=True,
)


def generate(request, context):
    from PIL import Image

    from engine.images import load_image, load_mask
    from plugins.stable_diffusion.pipeline import check_size, run

    ref = request.model
    if ref is None:
        raise UsageError("Stable Diffusion needs a model; import one with `studio models import FOLDER`.")
    opts = request.options
    check_size(opts["width"] or 64, opts["height"] or 64)  # a size given is checked before the model loads
    t0 = time.perf_counter()
    sd = context.loaded("sd", request, lambda: _load(request))
    load_s = time.perf_counter() - t0
    image = load_image(request.image) if request.image else None  # as every image the studio reads
    mask = load_mask(request.mask) if request.mask else None
    notes = []
    if image is not None and mask is not None and mask.size != image.size:
        notes.append(f"The mask is {mask.size[0]}x{mask.size[1]} and the image {image.size[0]}x{image.size[1]}; "
                     "the mask was resized to the image.")
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    yield from timed(run(sd, request.prompt or "", opts, request.seed, image, mask, context.cancel, notes), load_s)


def _load(request):
    """The model's networks on the request's backend: onnxruntime sessions of its export (no torch), or torch
    modules with the request's LoRA files (kohya or diffusers/PEFT format, several, each with its weight) on the
    U-Net and text encoder."""
    folder = Path(request.model.path)
    if request.backend == "onnx":
        from plugins.stable_diffusion.onnx import load_onnx

        return load_onnx(folder, request.model.hash, request.export)
    from plugins.stable_diffusion.model import load
    from plugins.stable_diffusion.pipeline import torch_nets

    sd = load(folder, request.device)
    if request.adapters:
        from engine.nn.lora import apply_adapters

        apply_adapters({"unet": sd.unet, "text_encoder": sd.text_encoder}, request.adapters)
    return torch_nets(sd)


def _detect_pipeline(path: Path) -> bool:
    from plugins.stable_diffusion.folder import detect

    return detect(path)


def _detect_single_file(path: Path) -> bool:
    from plugins.stable_diffusion.single_file import detect

    return detect(path)


@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))


@hookimpl
def register_finetuners(register):
    register(finetuner("sd", "LoRA on a Stable Diffusion model from captioned images (kohya format)",
                       "plugins.stable_diffusion.finetune", data="images", generator="sd"))


@hookimpl
def register_exporters(register):
    register("stable-diffusion", lazy("plugins.stable_diffusion.onnx", "export_sd"))


@hookimpl
def register_architectures(register):
    register(Architecture(family="stable-diffusion", generator="sd",
                          matches=lambda cfg: cfg.get("model_type") == MODEL_TYPE,
                          check=lazy("plugins.stable_diffusion.model", "check_folder"),
                          needs_tokenizer=True, title="Stable Diffusion 1.x / 2.x (U-Net, VAE, CLIP text encoder)"))


@hookimpl
def register_importers(register):
    register(Importer("diffusers-sd", _detect_pipeline, lazy("plugins.stable_diffusion.folder", "convert"),
                      title="a diffusers Stable Diffusion pipeline folder (model_index.json)"))
    register(Importer("sd-single-file", _detect_single_file, lazy("plugins.stable_diffusion.single_file", "convert"),
                      title="a single-file Stable Diffusion 1.x/2.x checkpoint (.safetensors, or .ckpt with --trust)"))
