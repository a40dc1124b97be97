"""`studio finetune image`: a LoRA on the shapes diffusion model from a folder of captioned images.

    studio finetune image --model shapes-diffusion --data stars/ --steps 400

The folder holds images (PNG, JPEG, WebP) with a same-named ``.txt`` caption beside each (``star1.png`` +
``star1.txt``), the kohya / AUTOMATIC1111 convention. Adapters go on the U-Net's attention, feed-forward and
conditioning projections and on the text encoder's; the file is kohya's single ``.safetensors``
(``lora_unet_*``, ``lora_te_*``), which diffusers' ``load_lora_weights`` and other tools read. Words the model's
tokenizer does not know (a new shape's name, say) all become its unknown token: the adapter then learns what
that token means in this position, which is how the studio's star demonstration teaches a new shape
(benchmarks/finetune_star.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.diffusion.finetune import DenoiserTask
from engine.finetune import captioned_data, base_model, device_of, lora_options, parse_command, run_folder, start
from engine.generators import Option

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2", "time_emb_proj")  # names diffusers maps
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


OPTIONS = lora_options(steps=400, lr=2e-3, batch=16, rank=8, alpha=8.0, dropout=0.0, every=100) + (
    Option("caption_dropout", "float", 0.1, "share of captions trained as empty (what guidance needs)", min=0.0,
           max=1.0),
    Option("val_fraction", "float", 0.1, "share of the images held out for validation", min=0.0, max=0.9),
    Option("sample_steps", "int", 12, "denoising steps of the sample images drawn at each evaluation (0: none)",
           min=0, max=1000),
    Option("text_encoder", "bool", True, "also adapt the text encoder (off: the U-Net only, which leaves every "
           "other prompt's conditioning as it was)"),
    Option("prior_data", "str", "", "a folder of captioned images of what the model already draws, mixed into "
           "every batch so that it does not forget them (prior preservation; empty: none)"),
    Option("prior_share", "float", 0.5, "share of each batch drawn from the prior images", min=0.0, max=1.0),
)


def parse_args(argv):
    return parse_command("image", __doc__.split("\n")[0], "a folder of images with same-named .txt captions",
                         OPTIONS, argv)


class ImageTask(DenoiserTask):
    def __init__(self, entry, pairs: list, a, prior: list = ()):
        import hashlib

        import numpy as np
        import torch
        from PIL import Image

        from engine.diffusion.schedulers.common import alphas_cumprod
        from engine.images import load_image
        from plugins.image import model as M
        from plugins.image.pipeline import coord_maps

        self.entry, self.a, self.device = entry, a, device_of(a)
        device = self.device
        self.loaded = M.load(Path(entry.path), device, torch.float32)  # trained in fp32 on any device
        cfg = self.loaded.cfg
        text = getattr(a, "text_encoder", True)
        self.adapt(self.loaded.unet, self.loaded.text_encoder, UNET_TARGETS, TEXT_TARGETS)
        S, enc = cfg.sample_size, self.loaded.prompt_encoder
        images, ids, unknown, h = [], [], set(), hashlib.sha256()
        self.captions = [caption for _, caption in pairs]
        for path, caption in list(pairs) + list(prior):
            im = load_image(path)  # EXIF turned, transparency on white, as everywhere
            if im.size != (S, S):
                im = im.resize((S, S), Image.Resampling.BICUBIC)
            images.append(np.asarray(im))
            e = enc.encode(caption)
            unknown.update(e.unknown)
            ids.append(e.ids)
            h.update(path.name.encode() + b"\0" + caption.encode() + b"\0" + images[-1].tobytes())
        n = len(pairs)
        self.split(n, a.val_fraction, a.seed)
        self.prior_idx = np.arange(n, len(images))  # the prior images: trained on, never validated
        self.x0 = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)
        self.ids = torch.tensor(ids, device=device)
        self.empty = torch.tensor(enc.encode("").ids, device=device)
        self.coords = torch.from_numpy(coord_maps(S, cfg.coord_channels)).to(device)
        self.acp = torch.from_numpy(alphas_cumprod(cfg.scheduler).astype(np.float64)).to(device)
        self.unknown = sorted(unknown)
        self.summary = f"{n} images" + (f"; unknown words (learned as the unknown token): {', '.join(self.unknown)}"
                                        if self.unknown else "")
        self.recipe = {"kind": "image", "base_model": {"name": entry.name, "hash": entry.hash,
                                                       "family": entry.family},
                       "data": {"path": str(Path(a.data).expanduser().resolve()), "images": n,
                                "prior_images": len(prior), "prior_share": a.prior_share if prior else 0.0,
                                "text_encoder": bool(text),
                                "sha256": h.hexdigest(), "unknown_words": self.unknown,
                                "train": int(len(self.train_idx)), "val": int(len(self.val_idx))},
                       "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "layers": len(self.paths),
                                "format": "kohya"}, "seed": a.seed}

    def _loss(self, idx, t, noise, drop):
        """v-prediction loss with the min-SNR weight (5) the base model was trained with."""
        import torch
        import torch.nn.functional as F

        from plugins.image.pipeline import class_vector

        x0 = self.x0[idx]
        ids = torch.where(drop[:, None], self.empty[None], self.ids[idx])
        a = self.acp[t].float()[:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        hidden, pooled = self.loaded.text_encoder(ids)
        labels = class_vector(hidden, pooled, ids, self.loaded.cfg.class_labels)
        B = len(idx)
        pred = self.loaded.unet(torch.cat([xt, self.coords.expand(B, -1, -1, -1)], 1), t.float(), hidden, labels)
        snr = self.acp[t] / (1 - self.acp[t])
        w = ((snr.clamp(max=5.0) + 1.0) / (snr + 1)).float()
        return (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()

    def sample(self):
        """Up to four images in a row, for the first captions of the dataset (held-out ones first) with fixed seeds,
        so the same prompts show the adapter's progress at every evaluation; None with --sample-steps 0."""
        import numpy as np
        from PIL import Image

        from engine.diffusion import SampleSettings
        from plugins.image.pipeline import generate_images, torch_nets

        if not getattr(self.a, "sample_steps", 0):
            return None
        captions = [self.captions[i] for i in self.shown(4)]
        images = generate_images(torch_nets(self.loaded), captions, SampleSettings(steps=self.a.sample_steps), seed=0)
        return Image.fromarray(np.concatenate(list(images), axis=1))

    def save(self, folder: Path) -> None:
        from engine.nn.lora import save_kohya

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        modules = {"unet": self.loaded.unet}
        if getattr(self.a, "text_encoder", True):
            modules["text_encoder"] = self.loaded.text_encoder
        save_kohya(modules,
                   folder / "adapter.safetensors", self.spec,
                   metadata={"ss_base_model": self.entry.name, "studio_base_model_hash": self.entry.hash})
        (folder / "studio_adapter.json").write_text(json.dumps({"recipe": self.recipe}, indent=2) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    entry = base_model(a, lambda e: e.family == "shapes-diffusion", "the shapes diffusion model")
    pairs, prior = captioned_data(a)
    return start(ImageTask(entry, pairs, a, prior=prior), a, run_folder(a, entry), "adapter.safetensors")
