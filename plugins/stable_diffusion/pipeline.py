"""Stable Diffusion on the shared sampling loop (engine.diffusion.sample_steps): text to image, img2img (``image``
and ``strength``) and inpainting (``image`` and ``mask``: the 9-channel inpainting U-Net, or an ordinary U-Net with
the kept region put back after every step), in latent space, decoded by the VAE.

Random numbers come from one generator seeded by the recipe's seed, drawn in the order diffusers' pipelines draw
them (the image's latent sample, the initial noise, the masked image's latent sample, then the ancestral
samplers' noise), so a seed gives diffusers' picture and a replay gives the same one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from engine.diffusion import SampleSettings
from engine.errors import UsageError

DEFAULTS = {"steps": 25, "guidance": 7.5, "sampler": "dpmpp_2m_karras"}
MAX_PIXELS = 2048 * 2048
# A cheap preview: latents to RGB by a fixed linear map (the "approximate" previews of A1111 and ComfyUI).
PREVIEW = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
                   dtype=np.float32)


def check_size(width: int, height: int) -> None:
    """UsageError before anything loads for a size the U-Net cannot take or memory cannot hold."""
    for name, v in (("width", width), ("height", height)):
        if v % 8 or v < 8:
            raise UsageError(f"The {name} must be a multiple of 8 pixels, not {v}.")
    if width * height > MAX_PIXELS:
        raise UsageError(f"{width} x {height} is larger than {MAX_PIXELS // 2048} x 2048 pixels; choose a smaller "
                         "size (and upscale afterwards).")


def default_size(cfg: dict) -> int:
    """512 for SD 1.x, 768 for SD 2.x v-prediction: the VAE's sample size in the config when it is one of them."""
    size = (cfg.get("vae") or {}).get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    if cfg.get("prediction_type") == "v_prediction" or (cfg.get("scheduler") or {}).get("prediction_type") == \
            "v_prediction":
        return 768
    return int(size) if isinstance(size, int) and size in (256, 512, 768, 1024) else 512


@dataclass
class SDNets:
    """One Stable Diffusion model on one backend, as the sampling loop needs it. ``xp`` is the loop's array adapter
    (engine.diffusion.TorchArrays or NumpyArrays); ``text(ids)`` maps (n, 77) int64 numpy ids to (n, 77, D) numpy
    hidden states; ``unet(x, t, context)``, ``vae_encode(x) -> (mean, std)`` and ``vae_decode(z)`` take and give
    ``xp`` arrays. ``torch_nets`` (below) and ``plugins.stable_diffusion.onnx.onnx_nets`` build one."""
    xp: object
    cfg: dict
    tokenizer: object
    scheduler: object  # engine.diffusion.schedulers.SchedulerConfig
    text: Callable
    unet: Callable
    vae_encode: Callable
    vae_decode: Callable
    in_channels: int
    out_channels: int
    factor: int  # pixels per latent along a side (8)
    scaling_factor: float
    tile: int  # latents per side of a tile for tiled decoding

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9


def torch_nets(sd) -> SDNets:
    """SDNets of a loaded model (plugins.stable_diffusion.model.LoadedSD) on its device and dtype."""
    import torch

    from engine.diffusion import TorchArrays

    def text(ids):
        with torch.no_grad():
            hidden, _ = sd.text_encoder(torch.from_numpy(ids).to(sd.device))
        return hidden.float().cpu().numpy()

    def unet(x, t, context):
        with torch.no_grad():
            out = sd.unet(x.to(sd.device, sd.dtype), torch.tensor([t] * len(x), device=sd.device),
                          context.to(sd.device, sd.dtype))
        return out.float().cpu()

    def vae_encode(x):
        with torch.no_grad():
            mean, logvar = sd.vae.encode(x.to(sd.device))
        return mean.float().cpu(), torch.exp(0.5 * logvar).float().cpu()

    def vae_decode(z):
        with torch.no_grad():
            return sd.vae.decode(z.to(sd.device)).float().cpu()

    vae = sd.vae
    return SDNets(TorchArrays(), sd.cfg, sd.tokenizer, sd.scheduler, text, unet, vae_encode, vae_decode,
                  sd.unet.config.in_channels, sd.unet.config.out_channels, vae.factor, vae.config.scaling_factor,
                  vae.config.sample_size // vae.factor)


def nets_of(sd) -> SDNets:
    return sd if isinstance(sd, SDNets) else torch_nets(sd)


def encode_text(nets: SDNets, prompt: str, negative: str):
    """(prompt, negative prompt) CLIP hidden states (1, 77 k, D) with A1111 emphasis and 75-token chunks
    (plugins/stable_diffusion/prompts.py), as ``nets.xp`` arrays, and k - 1."""
    from plugins.stable_diffusion.prompts import encode_prompts

    pos, neg, extra = encode_prompts(prompt, negative, nets.tokenizer, nets.text)
    return nets.xp.from_numpy(pos), nets.xp.from_numpy(neg), extra


def pixels(image, width: int, height: int) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1] from a PIL image, resized (Lanczos) to the output size."""
    from PIL import Image

    im = image.convert("RGB")
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.LANCZOS)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return np.ascontiguousarray(a.transpose(2, 0, 1)[None] * 2.0 - 1.0)


def mask_pixels(mask, width: int, height: int) -> np.ndarray:
    """(1, 1, H, W) of 0 (keep) and 1 (repaint) from a mask image (white = repaint), as diffusers binarizes it."""
    from PIL import Image

    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(m, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]


def paste_unmasked(out, image, mask):
    """``out`` with ``image``'s own pixels where ``mask`` is black, the two blended by its grey levels (a blurred
    mask's soft edge), as AUTOMATIC1111 overlays an inpainting result: the kept region is the input exactly,
    not the VAE's reconstruction of it."""
    from PIL import Image

    size = out.size
    m = mask.convert("L")
    m = m if m.size == size else m.resize(size, Image.Resampling.LANCZOS)
    source = image.convert("RGB")
    source = source if source.size == size else source.resize(size, Image.Resampling.LANCZOS)
    return Image.composite(out.convert("RGB"), source, m)


def vae_sample(nets: SDNets, x, generator):
    """Latents of images ``x`` drawn from the VAE's distribution with ``generator``, times the scaling factor."""
    mean, std = nets.vae_encode(x)
    noise = nets.xp.noise(tuple(mean.shape), generator)
    return (mean + std * noise) * nets.xp.scalar(nets.scaling_factor)


def decode(sd, latents, tiled: bool = False) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] (numpy) from latents (the scaling factor undone)."""
    from engine.diffusion.tiles import decode_tiled

    nets = nets_of(sd)
    z = latents / nets.xp.scalar(nets.scaling_factor)
    x = decode_tiled(nets.xp, nets.vae_decode, z, nets.tile, nets.factor) if tiled else nets.vae_decode(z)
    return np.clip(nets.xp.to_numpy(x), -1, 1)


def preview(x0) -> np.ndarray:
    """(H/8, W/8, 3) uint8: a linear map of the latent estimate to colours."""
    rgb = np.tensordot(np.asarray(x0[0], dtype=np.float32).transpose(1, 2, 0), PREVIEW, axes=1)
    return np.round((np.clip(rgb, -1, 1) + 1) * 127.5).astype(np.uint8)


def sample(sd, prompt: str, negative: str, settings: SampleSettings, seed: int, width: int, height: int,
           image=None, mask=None, strength: float = 1.0) -> Iterator:
    """The sampling loop's events ``(i, n, x0 latents)``, then ``(n, n, latents)``; ``image``/``mask`` PIL images;
    ``sd`` an SDNets (either backend) or a loaded torch model."""
    from engine.diffusion import sample_steps

    nets = nets_of(sd)
    xp = nets.xp
    gen = xp.generator(seed)
    cond, uncond, _ = encode_text(nets, prompt, negative)
    guided = settings.guidance != 1.0
    context = xp.cat([uncond, cond]) if guided else cond
    f = nets.factor  # 8 for Stable Diffusion's VAE
    shape = (1, nets.out_channels, height // f, width // f)
    extra = noise = None  # extra: the inpainting U-Net's mask and masked-image latents
    start = after = None
    if image is not None:
        x = xp.from_numpy(pixels(image, width, height))
        m = xp.from_numpy(mask_pixels(mask, width, height)) if mask is not None else None
        inpaint, box = m is not None, {}
        pure = inpaint and strength >= 1.0  # inpainting at full strength starts from pure noise
        image_latents = None if pure and nets.inpainting else vae_sample(nets, x, gen)
        noise = xp.noise(shape, gen)
        start, after = _start(box, pure, image_latents, noise, settings.steps, strength), None
        if inpaint:
            masked = vae_sample(nets, x * (m < 0.5), gen)
            small = m[:, :, ::f, ::f]  # nearest-neighbour downsampling by the exact factor (as torch's interpolate)
            if nets.inpainting:
                extra = xp.cat([small, masked], axis=1)
                extra = xp.cat([extra, extra]) if guided else extra
            else:
                after = _blend(box, small, image_latents, noise, settings.steps)
    elif mask is not None:
        raise UsageError("A mask needs an input image to paint into; give --image too.")
    if nets.inpainting and extra is None:  # no mask on an inpainting U-Net: all masked, over grey (as A1111)
        mean, _ = nets.vae_encode(xp.from_numpy(np.zeros((1, 3, height, width), np.float32)))
        extra = xp.cat([xp.from_numpy(np.ones((1, 1) + shape[2:], np.float32)),
                        mean * xp.scalar(nets.scaling_factor)], axis=1)
        extra = xp.cat([extra, extra]) if guided else extra

    def denoise(x, t: float):
        return nets.unet(x if extra is None else xp.cat([x, extra], axis=1), t, context)

    return sample_steps(xp, denoise, shape, nets.scheduler, settings, gen, noise=noise, start=start, after_step=after,
                        clip=False)


def _start(box: dict, pure: bool, image_latents, noise, steps: int, strength: float):
    """``start`` for the loop: pure noise (inpainting at full strength), else the image's latents noised to the
    step that ``strength`` leaves (diffusers' img2img: the last int(steps x strength) steps run)."""
    def start(sched):
        box["sched"] = sched
        if pure:
            return noise * sched.init_noise_sigma, 0
        begin = steps - min(int(steps * strength), steps)
        return sched.add_noise(image_latents, noise, begin), begin
    return start


def _blend(box: dict, mask, image_latents, noise, steps: int):
    """``after_step`` for inpainting with an ordinary U-Net: the kept region (mask 0) put back, noised to the
    next step's level (clean after the last step)."""
    def after(index, latents):
        kept = image_latents if index >= steps else box["sched"].add_noise(image_latents, noise, index)
        return (1 - mask) * kept + mask * latents
    return after


def run(sd, prompt: str, options: dict, seed: int, image=None, mask=None, cancel=None, notes=()) -> Iterator:
    """Progress / Partial events and one Result."""
    from PIL import Image

    from engine.diffusion import to_uint8
    from engine.generators import Partial, Progress, Result

    sd = nets_of(sd)
    width, height = int(options["width"] or default_size(sd.cfg)), int(options["height"] or default_size(sd.cfg))
    check_size(width, height)
    strength = float(options.get("strength", 1.0)) if image is not None else 1.0
    settings = SampleSettings(int(options["steps"]), float(options["guidance"]), options["sampler"])
    negative = options.get("negative_prompt", "") or ""
    t0 = time.perf_counter()
    yield Progress(0, settings.steps, "encoding the prompt")
    steps = sample(sd, prompt or "", negative, settings, seed, width, height, image, mask, strength)
    every = max(1, settings.steps // 8)
    latents = None
    for k, (i, n, latents) in enumerate(steps):
        if k == n:
            break
        yield Progress(i, n, f"step {i}/{n}")
        if i % every == 0 and i < n:
            yield Partial(image=Image.fromarray(preview(sd.xp.to_numpy(latents))).resize((width, height)))
        if cancel is not None:
            cancel.raise_if_cancelled()
    yield Progress(settings.steps, settings.steps, "decoding")
    tiled = width * height > 768 * 768
    out = Image.fromarray(to_uint8(decode(sd, latents, tiled))[0])
    if mask is not None and options.get("keep_unmasked"):
        out = paste_unmasked(out, image, mask)
    warnings = list(notes)
    if not (prompt or "").strip() and image is None:  # as the image generator says it
        warnings.append("The prompt is empty, so the image is unconditional (any scene the model likes).")
    if image is not None and abs(image.size[0] * height - image.size[1] * width) > 0.02 * image.size[1] * width:
        warnings.append(f"The input image is {image.size[0]}x{image.size[1]}; it was resized to {width}x{height}, "
                        "another shape. Set width and height to keep its shape.")
    mode = "inpaint" if mask is not None else ("img2img" if image is not None else "txt2img")
    yield Result(image=out, warnings=warnings, info={
        "mode": mode, "width": width, "height": height, "steps": settings.steps, "sampler": settings.sampler,
        "guidance": settings.guidance, "strength": strength if image is not None else None,
        "negative_prompt": negative, "vae_tiled": tiled, "seconds": round(time.perf_counter() - t0, 4)})
