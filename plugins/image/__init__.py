"""Built-in plugin: text-to-image diffusion (conditional U-Net + CLIP-style text encoder).

No torch at import: the model loads at the first generation and is cached by the host's context.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import hookimpl
from engine.architectures import Architecture
from engine.errors import UsageError
from engine.generators import Generator, GeneratorInfo, Option, Trainer, finetuner, lazy, timed
from engine.samplers import SAMPLERS
from plugins.image.model import MODEL_TYPE  # config-only module: no torch, no numpy


INFO = GeneratorInfo(
    id="image",
    title="Image",
    description="Draw an image from a text prompt with a diffusion model.",
    takes=("text",),
    makes="image",
    options=(
        Option("steps", "int", 20, "Denoising steps (more is slower; 20 suits dpmpp_2m)", min=1, max=1000),
        Option("guidance", "float", 1.5, "Classifier-free guidance scale (1 = none; higher follows the prompt "
               "more closely)", min=0.0, max=30.0),
        Option("sampler", "str", "dpmpp_2m", "Sampler: ddpm, ddim, dpmpp_2m (DPM-Solver++ 2M), dpmpp_2m_karras, "
               "euler or euler_a (Euler ancestral)",
               choices=SAMPLERS),
        Option("negative_prompt", "str", "", "What to steer away from (replaces the empty prompt in guidance)"),
    ),
    families=("shapes-diffusion",),
    prompt_required=False,
    takes_lora=True,
)


def generate(request, context):
    """The same pipeline (plugins/image/pipeline.py) on either backend: torch modules, or onnxruntime sessions
    and numpy arrays with no torch (plugins/image/onnx.py)."""
    from plugins.image.pipeline import run

    ref = request.model
    if ref is None:
        raise UsageError("The image generator needs a model; choose one with --model.")
    t0 = time.perf_counter()
    nets = context.loaded("image", request, lambda: _load(request))
    yield from timed(run(nets, request.prompt or "", request.options, request.seed, context.cancel),
                     time.perf_counter() - t0)


def _load(request):
    ref = request.model
    if request.backend == "onnx":
        from plugins.image.onnx import load_image_model

        return load_image_model(Path(ref.path), ref.hash, export=request.export)
    from engine.nn.lora import apply_adapters
    from plugins.image import model as image_model
    from plugins.image.pipeline import torch_nets

    loaded = image_model.load(Path(ref.path), request.device)
    apply_adapters({"unet": loaded.unet, "text_encoder": loaded.text_encoder}, request.adapters)
    return torch_nets(loaded)


@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))


@hookimpl
def register_architectures(register):
    register(Architecture(family="shapes-diffusion", generator="image",
                          matches=lambda cfg: cfg.get("model_type") == MODEL_TYPE,
                          check=lazy("plugins.image.model", "check_folder"),
                          needs_tokenizer=True, title="Text-to-image diffusion (U-Net + CLIP text encoder)"))


@hookimpl
def register_exporters(register):
    register("shapes-diffusion", lazy("plugins.image.onnx", "export_image"))


@hookimpl
def register_trainers(register):
    register(Trainer("image", "Train the shapes text-to-image diffusion model", lazy("plugins.image.train", "main")))


@hookimpl
def register_finetuners(register):
    register(finetuner("image", "LoRA on the shapes diffusion model from captioned images (kohya format)",
                       "plugins.image.finetune", data="images", generator="image"))
