"""`studio finetune sd`: a LoRA on a Stable Diffusion model from a folder of captioned images (kohya format).

    studio finetune sd --model stable-diffusion-v1-5 --data my-dog/ --resolution 512 --steps 800

The folder holds images with a same-named ``.txt`` caption beside each (kohya / AUTOMATIC1111 convention). Images
are centre-cropped to a square and resized to ``--resolution``; the VAE encodes each once (the distribution's
mean, times the scaling factor), so a step costs one U-Net forward and backward (and the text encoder's, when it
trains too). The loss is the model's own: the noise (epsilon models) or the velocity (v-prediction, SD 2.x 768),
at a timestep drawn uniformly. Adapters go on the U-Net's attention and feed-forward projections and on the text
encoder's; the file is kohya's single ``.safetensors`` (``lora_unet_*``, ``lora_te_*``), which A1111, ComfyUI
and diffusers' ``load_lora_weights`` read, and ``studio generate sd --lora`` applies.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.diffusion.finetune import DenoiserTask
from engine.finetune import base_model, captioned_data, device_of, lora_options, parse_command, run_folder, start
from engine.generators import Option

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

OPTIONS = lora_options(steps=400, lr=1e-4, batch=1, rank=8, alpha=8.0, dropout=0.0, every=100) + (
    Option("resolution", "int", 0, "training size in pixels, a multiple of 8 (0: the model's own, 512 for SD 1.x)",
           min=0, max=2048),
    Option("text_encoder", "bool", False, "also adapt the text encoder (kohya's default learns the U-Net only)"),
    Option("caption_dropout", "float", 0.05, "share of captions trained as empty (keeps guidance working)",
           min=0.0, max=1.0),
    Option("val_fraction", "float", 0.1, "share of the images held out for validation", min=0.0, max=0.9),
    Option("sample_steps", "int", 0, "denoising steps of the sample images drawn at each evaluation (0: none; each "
           "is a full generation, slow on a CPU)", min=0, max=200),
)


def parse_args(argv):
    return parse_command("sd", __doc__.split("\n")[0], "a folder of images with same-named .txt captions", OPTIONS,
                         argv)


def square(im, size: int):
    """The largest centred square of a PIL image, resized (Lanczos) to ``size``."""
    from PIL import Image

    im = im.convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


class SDTask(DenoiserTask):
    def __init__(self, entry, pairs: list, a):
        import hashlib

        import numpy as np
        import torch
        from engine.diffusion.schedulers.common import alphas_cumprod
        from engine.images import load_image
        from plugins.stable_diffusion.model import load
        from plugins.stable_diffusion.pipeline import check_size, default_size, pixels
        from plugins.stable_diffusion.prompts import chunks

        self.entry, self.a, self.device = entry, a, device_of(a)
        device = self.device
        self.sd = load(Path(entry.path), device, torch.float32)  # trained in fp32 on any device
        size = a.resolution or default_size(self.sd.cfg)
        check_size(size, size)
        self.size = size
        self.summary = f"{len(pairs)} images at {size} x {size}"
        text = bool(a.text_encoder)
        self.adapt(self.sd.unet, self.sd.text_encoder, UNET_TARGETS, TEXT_TARGETS)
        tok = self.sd.tokenizer

        def ids_of(caption: str) -> list:
            return chunks(caption, tok.tokens, tok.bos, tok.eos, tok.pad, -1)[0][0]  # the first 75 tokens

        latents, ids, h = [], [], hashlib.sha256()
        self.captions = [caption for _, caption in pairs]
        vae = self.sd.vae
        for path, caption in pairs:
            im = square(load_image(path), size)  # EXIF turned, transparency on white, as everywhere
            with torch.no_grad():
                mean, _ = vae.encode(torch.from_numpy(pixels(im, size, size)).to(device))
            latents.append(mean[0].float().cpu() * vae.config.scaling_factor)
            ids.append(ids_of(caption))
            h.update(path.name.encode() + b"\0" + caption.encode() + b"\0" + np.asarray(im).tobytes())
        self.split(len(pairs), a.val_fraction, a.seed)
        self.x0 = torch.stack(latents).to(device)
        self.ids = torch.tensor(ids, device=device)
        self.empty = torch.tensor(ids_of(""), device=device)
        self.acp = torch.from_numpy(alphas_cumprod(self.sd.scheduler).astype(np.float64)).to(device)
        self.v_pred = self.sd.scheduler.prediction_type == "v_prediction"
        self.recipe = {"kind": "sd", "base_model": {"name": entry.name, "hash": entry.hash, "family": entry.family},
                       "data": {"path": str(Path(a.data).expanduser().resolve()), "images": len(pairs), "resolution": size,
                                "sha256": h.hexdigest(), "train": int(len(self.train_idx)),
                                "val": int(len(self.val_idx)), "text_encoder": text},
                       "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "layers": len(self.paths),
                                "format": "kohya"},
                       "loss": "v-prediction" if self.v_pred else "epsilon", "seed": a.seed}

    def _loss(self, idx, t, noise, drop):
        import torch
        import torch.nn.functional as F

        z0 = self.x0[idx]
        ids = torch.where(drop[:, None], self.empty[None], self.ids[idx])
        a = self.acp[t].float()[:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if self.v_pred else noise
        hidden, _ = self.sd.text_encoder(ids)
        return F.mse_loss(self.sd.unet(zt, t.float(), hidden), target)

    def sample(self):
        """Up to two images side by side for the first captions (held-out first), fixed seeds; None when
        --sample-steps is 0."""
        import numpy as np
        from PIL import Image

        from engine.diffusion import SampleSettings, to_uint8
        from plugins.stable_diffusion.pipeline import decode, sample, torch_nets

        if not self.a.sample_steps:
            return None
        nets = torch_nets(self.sd)
        images = []
        for i in self.shown(2):
            z = None
            for _, _, z in sample(nets, self.captions[i], "", SampleSettings(self.a.sample_steps, 7.5,
                                                                              "dpmpp_2m_karras"), 0, self.size,
                                  self.size):
                pass
            images.append(to_uint8(decode(nets, z))[0])
        return Image.fromarray(np.concatenate(images, axis=1))

    def save(self, folder: Path) -> None:
        from engine.nn.lora import save_kohya

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        modules = {"unet": self.sd.unet}
        if self.a.text_encoder:
            modules["text_encoder"] = self.sd.text_encoder
        save_kohya(modules, folder / "adapter.safetensors", self.spec,
                   metadata={"ss_base_model": self.entry.name, "studio_base_model_hash": self.entry.hash,
                             "ss_resolution": str(self.size)})
        (folder / "studio_adapter.json").write_text(json.dumps({"recipe": self.recipe}, indent=2) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    entry = base_model(a, lambda e: e.family == "stable-diffusion",
                       "a Stable Diffusion model (import one with `studio models import`)")
    return start(SDTask(entry, captioned_data(a)[0], a), a, run_folder(a, entry), "adapter.safetensors")
