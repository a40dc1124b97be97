"""AUTOMATIC1111-compatible endpoints (/sdapi/v1/*): txt2img, img2img, interrogate, sd-models, samplers, progress.

Fields the studio has no use for (hires fix, restore_faces, scripts, ...) are ignored, as A1111 clients send them
all; the ones that map to a generator's options are validated by it (the CLI's messages).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
from pathlib import Path

from engine.samplers import A1111_NAMES as SAMPLERS  # ours -> A1111's names
from engine.errors import CancelledError, StudioError, UsageError
from studio.api_openai import _number, image_generator
from studio.server import Unsupported, read_json, run_job

log = logging.getLogger(__name__)

MAX_IMAGES = 16


def routes() -> list:
    from starlette.routing import Route

    return [Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
            Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
            Route("/sdapi/v1/interrogate", interrogate, methods=["POST"]),
            Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
            Route("/sdapi/v1/samplers", samplers, methods=["GET"]),
            Route("/sdapi/v1/schedulers", schedulers, methods=["GET"]),
            Route("/sdapi/v1/progress", progress, methods=["GET"]),
            Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
            *[Route(path, _constant(value), methods=[method]) for path, method, value in NOTHING],
            Route("/sdapi/v1/options", options, methods=["GET", "POST"])]


# what the studio has none of, answered as A1111 answers with none, for clients that list them when they connect
NOTHING = (("/sdapi/v1/sd-vae", "GET", []), ("/sdapi/v1/upscalers", "GET", []), ("/sdapi/v1/prompt-styles", "GET", []),
           ("/sdapi/v1/embeddings", "GET", {"loaded": {}, "skipped": {}}),
           ("/sdapi/v1/refresh-checkpoints", "POST", None))


def _constant(value):
    async def answer(request):
        from starlette.responses import JSONResponse

        return JSONResponse(value)
    return answer


def _sampler(name) -> str:
    if not name:
        return ""
    key = str(name).strip().lower()
    for ours, title in SAMPLERS.items():
        if key in (ours, title.lower()):
            return ours
    raise UsageError(f"Sampler {name!r} is not available; use one of {', '.join(SAMPLERS.values())} "
                     "(GET /sdapi/v1/samplers).")


# A1111's schedule types (its `scheduler` field since 1.9) that map onto a sampler here; "automatic" keeps the
# sampler's own name (DPM++ 2M is uniform, DPM++ 2M Karras is Karras, as A1111 named them before 1.9)
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}


def _scheduled(sampler: str, scheduler) -> str:
    """The sampler with A1111's ``scheduler`` field applied to it ("" = the generator's default sampler)."""
    key = str(scheduler or "automatic").strip().lower()
    if key not in SCHEDULERS:
        raise UsageError(f"Schedule type {scheduler!r} is not available; use one of {', '.join(SCHEDULERS.values())} "
                         "(GET /sdapi/v1/schedulers).")
    if key == "automatic" or not sampler:
        return sampler
    base = sampler.removesuffix("_karras")
    if key == "karras" and base + "_karras" not in SAMPLERS:
        raise UsageError(f"The Karras schedule is available with {SAMPLERS['dpmpp_2m']} only, not with "
                         f"{SAMPLERS[sampler]}; use the schedule type Automatic.")
    return base + "_karras" if key == "karras" else base


def _options(service, generator: str, body: dict) -> dict:
    """The A1111 fields that the generator has options for."""
    have = {o.name for o in service.host.generator(generator).info.options}
    pairs = {"steps": _number(body, "steps", int), "guidance": _number(body, "cfg_scale", float),
             "negative_prompt": body.get("negative_prompt") or None,
             "sampler": _scheduled(_sampler(body.get("sampler_name") or body.get("sampler_index")),
                                   body.get("scheduler")) or None,
             "width": _number(body, "width", int), "height": _number(body, "height", int),
             "strength": _number(body, "denoising_strength", float),
             "keep_unmasked": True if body.get("mask") else None}  # A1111 overlays the input outside the mask
    return {k: v for k, v in pairs.items() if v is not None and k in have}


def _model(body: dict, service=None):
    """The request's checkpoint (override_settings), else the one chosen with POST /sdapi/v1/options."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise UsageError("override_settings must be an object, such as {\"sd_model_checkpoint\": NAME}.")
    name = overrides.get("sd_model_checkpoint") or _chosen(service)
    if name and not isinstance(name, str):
        raise UsageError(f"sd_model_checkpoint must be a model's name, not {name!r}.")
    return _strip_hash(name) if name else None


def _chosen(service):
    """The checkpoint chosen with POST /sdapi/v1/options while it is still an image model here; one removed while
    the server runs leaves the default, with a warning (as at a restart), not a 404 on every txt2img."""
    name = getattr(service, "a1111_model", None)
    if name:
        try:
            image_generator(service, name)
        except StudioError:
            log.warning("The A1111 API's checkpoint %r is no longer an image model here; txt2img uses the default "
                        "image model until POST /sdapi/v1/options chooses another.", name)
            service.a1111_model = name = None
    return name


def _strip_hash(title: str) -> str:
    """A1111 clients send titles such as 'shapes-diffusion [83364ea40f]'; the name is before the hash."""
    return title.split(" [", 1)[0].strip()


async def options(request):
    """The one A1111 option the studio has: ``sd_model_checkpoint``, the image model txt2img uses."""
    from starlette.responses import JSONResponse

    from starlette.concurrency import run_in_threadpool

    from engine import state

    service = request.app.state.service
    if request.method == "POST":
        body = await read_json(request)
        if "sd_model_checkpoint" in body:
            raw = body["sd_model_checkpoint"]
            if not isinstance(raw, str) or not _strip_hash(raw):
                raise UsageError(f"sd_model_checkpoint must be a model's name (GET /sdapi/v1/sd-models lists them), "
                                 f"not {raw!r}.")
            name = _strip_hash(raw)
            image_generator(service, name)  # unknown or not an image model: refused now
            # kept in the settings, as A1111 keeps it in its config: a restarted server uses it again
            await run_in_threadpool(state.update_settings, lambda s: setattr(s, "sd_model_checkpoint", name))
            service.a1111_model = name
    current = _chosen(service)
    if current is None:
        entry = service.store.default_for("image") if service.has_generator("image") else None
        current = entry.name if entry else ""
    return JSONResponse({"sd_model_checkpoint": current})


def restore_checkpoint(service) -> None:
    """At the server's start: the checkpoint chosen with POST /sdapi/v1/options before (the settings'
    ``sd_model_checkpoint``); one that is gone, or no longer an image model, leaves the default, with a warning."""
    from engine import state

    name = state.load_settings().sd_model_checkpoint
    if not name:
        return
    try:
        image_generator(service, name)
    except StudioError:  # removed, renamed, or its generator's plugin is gone
        log.warning("The A1111 API's checkpoint %r (sd_model_checkpoint in the settings) is no longer an image model "
                    "here; txt2img uses the default image model until POST /sdapi/v1/options chooses another.", name)
        return
    service.a1111_model = name


async def _images(request, service, body: dict, generator: str, model, image=None, mask=None):
    from starlette.responses import JSONResponse

    from engine.outputs import a1111_parameters
    from engine.runner import Job

    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise UsageError("prompt must be a string.")
    batch, rounds = _number(body, "batch_size", int, 1), _number(body, "n_iter", int, 1)
    if batch < 1 or rounds < 1:  # (-2 x -2 made 4 images)
        raise UsageError(f"batch_size and n_iter must be 1 or more, not {batch} and {rounds}.")
    count = batch * rounds
    if not 1 <= count <= MAX_IMAGES:
        raise UsageError(f"batch_size x n_iter must be from 1 to {MAX_IMAGES}, not {count}.")
    seed = _number(body, "seed", int, -1)
    if seed < 0:  # -1: one random seed for the batch, then seed + 1, ... as A1111 numbers a batch
        import random

        seed = random.randrange(2**31)
    if seed + count > 2**63:
        raise UsageError(f"seed {seed} with {count} images passes 2^63-1 (image i gets seed + i); use a smaller "
                         "seed.")
    options = _options(service, generator, body)
    images, seeds, infotexts, history_ids = [], [], [], []
    for i in range(count):
        job = Job(generator, prompt=prompt, image=image, mask=mask, model=model, options=options, seed=seed + i)
        try:
            finished = await run_job(service, job, request)
        except CancelledError:  # POST /sdapi/v1/interrupt: A1111 answers with the images made so far
            if not images:
                raise
            break
        recipe = finished["recipe"]
        images.append(base64.b64encode(Path(finished["files"][0]).read_bytes()).decode("ascii"))
        seeds.append(recipe["seed"])
        infotexts.append(a1111_parameters(recipe))
        history_ids.append(recipe.get("history_id"))
    count = len(images)
    info = {"prompt": prompt, "all_prompts": [prompt] * count, "seed": seeds[0], "all_seeds": seeds,
            "sampler_name": SAMPLERS.get(recipe["options"].get("sampler", ""), ""),
            "steps": recipe["options"].get("steps"),
            "cfg_scale": recipe["options"].get("guidance"), "width": recipe.get("width"),
            "height": recipe.get("height"), "sd_model_name": (recipe.get("model") or {}).get("name"),
            "infotexts": infotexts, "history_ids": history_ids}
    return JSONResponse({"images": images, "parameters": body, "info": json.dumps(info)})


async def txt2img(request):
    service = request.app.state.service
    body = await read_json(request)
    generator, model = image_generator(service, _model(body, service))
    return await _images(request, service, body, generator, model)


async def img2img(request):
    service = request.app.state.service
    body = await read_json(request)
    makers = [g.info.id for g, _ in service.host.generators.values()
              if g.info.makes == "image" and "image" in g.info.takes and "text" in g.info.takes]
    if not makers:
        raise Unsupported("img2img needs an image-to-image generator (such as Stable Diffusion); none is installed.")
    inits = body.get("init_images")
    if not isinstance(inits, list) or len(inits) != 1:  # A1111 pairs several with a batch; the studio takes one
        raise UsageError("init_images must be a list holding one base64 image (one request per input image).")
    generator = makers[0]
    model = _model(body, service)
    if model:
        generator, model = image_generator(service, model)
    mask = None
    if body.get("mask"):  # inpainting: white repaints, unless inpainting_mask_invert; softened by mask_blur pixels
        if isinstance(body.get("inpainting_mask_invert"), bool):  # some clients send true/false for 1/0
            body = {**body, "inpainting_mask_invert": int(body["inpainting_mask_invert"])}
        invert, blur = _number(body, "inpainting_mask_invert", int, 0), _number(body, "mask_blur", float, 4.0)
        if invert not in (0, 1) or blur < 0:
            raise UsageError("inpainting_mask_invert must be 0 or 1 and mask_blur at least 0.")
        mask = str(save_input(body["mask"], lambda im: _inpaint_mask(im, bool(invert), blur)))
    return await _images(request, service, body, generator, model, image=str(save_input(inits[0])), mask=mask)


def _inpaint_mask(image, invert: bool, blur: float):
    """A1111's mask as the generator takes it: read as every mask (engine.images.load_mask: its alpha when it has
    real transparency, else its grey levels), inverted on request, blurred by ``mask_blur``."""
    from PIL import ImageFilter, ImageOps

    from engine.images import load_mask

    mask = load_mask(image)
    mask = ImageOps.invert(mask) if invert else mask
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


async def interrogate(request):
    from starlette.responses import JSONResponse

    from engine.runner import Job

    service = request.app.state.service
    body = await read_json(request)
    if not service.has_generator("caption"):
        raise Unsupported("Interrogate needs the caption generator, which is not installed.")
    if not body.get("image"):
        raise UsageError("image must be a base64-encoded image.")
    finished = await run_job(service, Job("caption", image=str(save_input(body["image"]))), request)
    return JSONResponse({"caption": finished["recipe"].get("text", "")})


def save_input(data, transform=None) -> Path:
    """A base64 image (with or without a data: prefix) checked by Pillow and kept under the state folder by
    content hash (so the recipe replays); ``transform(image) -> image`` first, when given."""
    from engine import state
    from engine.images import open_image
    from engine.outputs import atomic_write_bytes

    if not isinstance(data, str):
        raise UsageError("An image must be a base64 string.")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:  # read as every image the studio reads (its limits, formats and EXIF turn: the PNG keeps no EXIF)
        im = open_image(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"The image could not be read (not base64: {exc}).") from None
    except UsageError as exc:
        raise UsageError(f"The image could not be read ({str(exc).rstrip('.')}).") from None
    im = transform(im) if transform else im
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):  # CMYK, YCbCr, ...: no PNG mode
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    png = buf.getvalue()
    path = state.home() / "inputs" / (hashlib.sha256(png).hexdigest() + ".png")
    if not path.exists():
        atomic_write_bytes(path, png)
    return path


async def sd_models(request):
    from starlette.responses import JSONResponse

    service = request.app.state.service
    makers = {g.info.id for g, _ in service.host.generators.values() if g.info.makes == "image"}
    return JSONResponse([{"title": f"{e.name} [{e.hash[:10]}]", "model_name": e.name, "hash": e.hash[:10],
                          "sha256": e.hash, "filename": str(e.path), "config": None}
                         for e in service.store.list() if e.generator in makers])


async def samplers(request):
    from starlette.responses import JSONResponse

    service = request.app.state.service
    choices = ()
    if service.has_generator("image"):
        for o in service.host.generator("image").info.options:
            if o.name == "sampler":
                choices = tuple(o.choices or ())
    return JSONResponse([{"name": SAMPLERS.get(c, c), "aliases": [c], "options": {}} for c in choices or SAMPLERS])


async def schedulers(request):
    from starlette.responses import JSONResponse

    return JSONResponse([{"name": name, "label": label, "aliases": None, "default_rho": -1,
                          "need_inner_model": False} for name, label in SCHEDULERS.items()])


async def interrupt(request):
    """Stop the image the server makes now; its txt2img / img2img request answers with the images made before."""
    from starlette.responses import JSONResponse

    service = request.app.state.service
    job = service.worker.current
    if job is not None and job.kind == "generate" and service.has_generator(job.job.get("generator", "")) and \
            service.host.generator(job.job["generator"]).info.makes == "image":  # not another client's text
        try:
            service.queue.cancel(job.id)
        except UsageError:  # it finished in the meantime
            pass
    return JSONResponse({})


async def progress(request):
    from starlette.responses import JSONResponse

    service = request.app.state.service
    job = service.worker.current
    queued = len(service.queue.list(states=("queued",)))
    if job is None:
        return JSONResponse({"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": "",
                             "state": {"job": "", "job_count": queued, "sampling_step": 0, "sampling_steps": 0,
                                       "interrupted": False, "skipped": False}})
    now = service.queue.get(job.id)
    import time

    frac = now.progress
    elapsed = time.time() - (now.started or time.time())
    eta = elapsed / frac - elapsed if frac > 0 else 0.0
    return JSONResponse({"progress": round(frac, 4), "eta_relative": round(eta, 2), "current_image": None,
                         "textinfo": now.message,
                         "state": {"job": f"job {now.id}", "job_count": queued + 1, "sampling_step": now.step,
                                   "sampling_steps": now.total, "interrupted": now.cancel, "skipped": False}})
