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

import argparse
import json
import sys
from pathlib import Path

from engine.datasets import captioned_images
from engine.errors import UsageError
from engine.finetune import Task, add_options, lora_options, run_command
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
    p = argparse.ArgumentParser(prog="studio finetune sd", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model (from `studio models list`)")
    p.add_argument("--data", required=True, help="a folder of images with same-named .txt captions")
    p.add_argument("--out", help="run folder (default: $STUDIO_HOME/finetunes/<model>-<data name>)")
    add_options(p, OPTIONS)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def square(im, size: int):
    """The largest centred square of a PIL image, resized (Lanczos) to ``size``."""
    from PIL import Image

    im = im.convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


class SDTask(Task):
    def __init__(self, entry, pairs: list, a, device: str = "cpu"):
        import hashlib

        import numpy as np
        import torch
        from PIL import Image

        from engine.diffusion.schedulers.common import alphas_cumprod
        from engine.nn.lora import LoraSpec, wrap
        from plugins.stable_diffusion.model import load
        from plugins.stable_diffusion.pipeline import check_size, default_size, pixels
        from plugins.stable_diffusion.prompts import chunks

        self.entry, self.a = entry, a
        self.sd = load(Path(entry.path), device)
        size = a.resolution or default_size(self.sd.cfg)
        check_size(size, size)
        self.size = size
        text = bool(a.text_encoder)
        targets = UNET_TARGETS + (TEXT_TARGETS if text else ())
        self.spec = LoraSpec(a.rank, a.alpha, a.dropout, targets)
        self.paths = wrap(self.sd.unet, LoraSpec(a.rank, a.alpha, a.dropout, UNET_TARGETS), seed=a.seed)
        if text:
            self.paths += wrap(self.sd.text_encoder, LoraSpec(a.rank, a.alpha, a.dropout, TEXT_TARGETS),
                               seed=a.seed + 1)
        else:
            for p in self.sd.text_encoder.parameters():
                p.requires_grad_(False)
        self.model = torch.nn.ModuleDict({"unet": self.sd.unet, "text_encoder": self.sd.text_encoder})
        tok = self.sd.tokenizer

        def ids_of(caption: str) -> list:
            return chunks(caption, tok.tokens, tok.bos, tok.eos, tok.pad, -1)[0][0]  # the first 75 tokens

        latents, ids, h = [], [], hashlib.sha256()
        self.captions = [caption for _, caption in pairs]
        vae = self.sd.vae
        for path, caption in pairs:
            with Image.open(path) as im:
                im = square(im, size)
            with torch.no_grad():
                mean, _ = vae.encode(torch.from_numpy(pixels(im, size, size)).to(device))
            latents.append(mean[0].float().cpu() * vae.config.scaling_factor)
            ids.append(ids_of(caption))
            h.update(path.name.encode() + b"\0" + caption.encode() + b"\0" + np.asarray(im).tobytes())
        rng = np.random.default_rng(a.seed)
        n = len(pairs)
        order = rng.permutation(n)
        n_val = max(1, int(round(n * a.val_fraction))) if n > 1 else 0
        self.val_idx, self.train_idx = order[:n_val], order[n_val:] if n_val < n else order
        self.z0 = torch.stack(latents)
        self.ids = torch.tensor(ids)
        self.empty = torch.tensor(ids_of(""))
        self.acp = torch.from_numpy(alphas_cumprod(self.sd.scheduler).astype(np.float64))
        self.v_pred = self.sd.scheduler.prediction_type == "v_prediction"
        self.recipe = {"kind": "sd", "base_model": {"name": entry.name, "hash": entry.hash, "family": entry.family},
                       "data": {"path": str(Path(a.data).expanduser().resolve()), "images": n, "resolution": size,
                                "sha256": h.hexdigest(), "train": int(len(self.train_idx)),
                                "val": int(len(self.val_idx)), "text_encoder": text},
                       "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "layers": len(self.paths),
                                "format": "kohya"},
                       "loss": "v-prediction" if self.v_pred else "epsilon", "seed": a.seed}

    def _loss(self, idx, t, noise, drop):
        import torch
        import torch.nn.functional as F

        z0 = self.z0[idx]
        ids = torch.where(drop[:, None], self.empty[None], self.ids[idx])
        a = self.acp[t].float()[:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if self.v_pred else noise
        hidden, _ = self.sd.text_encoder(ids)
        return F.mse_loss(self.sd.unet(zt, t.float(), hidden), target)

    def batch(self, rng):
        import torch

        idx = torch.from_numpy(rng.choice(self.train_idx, size=self.a.batch))
        t = torch.from_numpy(rng.integers(0, len(self.acp), size=self.a.batch))
        noise = torch.from_numpy(rng.standard_normal((self.a.batch, *self.z0.shape[1:])).astype("float32"))
        drop = torch.from_numpy(rng.random(self.a.batch) < self.a.caption_dropout)
        return idx, t, noise, drop

    def loss(self, batch):
        return self._loss(*batch)

    def val_loss(self) -> float:
        """The loss on the held-out images at 8 fixed timesteps and noises (the same at every evaluation)."""
        import numpy as np
        import torch

        idx = self.val_idx if len(self.val_idx) else self.train_idx[:1]
        rng = np.random.default_rng(12345)
        total = 0.0
        for t in np.linspace(50, len(self.acp) - 50, 8).astype(int):
            noise = torch.from_numpy(rng.standard_normal((len(idx), *self.z0.shape[1:])).astype("float32"))
            total += float(self._loss(torch.from_numpy(idx), torch.full((len(idx),), int(t)), noise,
                                      torch.zeros(len(idx), dtype=torch.bool)))
        return total / 8

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
        order = list(self.val_idx) + [i for i in self.train_idx if i not in set(self.val_idx)]
        images = []
        for i in order[:2]:
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
    import torch

    from engine import state
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.rank < 1 or a.steps < 1 or a.batch < 1 or not a.lr > 0:
        raise UsageError("--rank, --steps and --batch must be at least 1 and --lr above 0.")
    if a.threads:
        torch.set_num_threads(a.threads)
    entry = ModelStore(PluginHost().load()).get(a.model)
    if entry.family != "stable-diffusion":
        raise UsageError(f"{entry.name} is a {entry.family} model; `studio finetune sd` fine-tunes Stable Diffusion "
                         "models (import one with `studio models import`).")
    pairs = captioned_images(Path(a.data))
    out = Path(a.out).expanduser() if a.out else state.home() / "finetunes" / f"{entry.name}-{Path(a.data).name}"
    task = SDTask(entry, pairs, a)
    print(f"fine-tuning {entry.name}: LoRA rank {a.rank} on {len(task.paths)} layers, "
          f"{sum(p.numel() for p in task.model.parameters() if p.requires_grad):,} trainable parameters; "
          f"{len(pairs)} images at {task.size} x {task.size}; run folder {out}", file=sys.stderr)
    return run_command(task, a, out, "adapter.safetensors")
