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

import argparse
import json
import sys
from pathlib import Path

from engine.errors import UsageError
from engine.datasets import captioned_images
from engine.finetune import Task, add_options, lora_options, run_command
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
    p = argparse.ArgumentParser(prog="studio finetune image", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model (from `studio models list`)")
    p.add_argument("--data", required=True, help="a folder of images with same-named .txt captions")
    p.add_argument("--out", help="run folder (default: $STUDIO_HOME/finetunes/<model>-<data name>)")
    add_options(p, OPTIONS)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


class ImageTask(Task):
    def __init__(self, entry, pairs: list, a, device: str = "cpu", prior: list = ()):
        import hashlib

        import numpy as np
        import torch
        from PIL import Image

        from engine.diffusion.schedulers.common import alphas_cumprod
        from engine.nn.lora import LoraSpec, wrap
        from plugins.image import model as M
        from plugins.image.pipeline import coord_maps

        self.entry, self.a = entry, a
        self.loaded = M.load(Path(entry.path), device)
        cfg = self.loaded.cfg
        text = getattr(a, "text_encoder", True)
        self.spec = LoraSpec(a.rank, a.alpha, a.dropout, UNET_TARGETS + (TEXT_TARGETS if text else ()))
        self.paths = wrap(self.loaded.unet, LoraSpec(a.rank, a.alpha, a.dropout, UNET_TARGETS), seed=a.seed)
        if text:
            self.paths += wrap(self.loaded.text_encoder, LoraSpec(a.rank, a.alpha, a.dropout, TEXT_TARGETS),
                               seed=a.seed + 1)
        else:
            for p in self.loaded.text_encoder.parameters():
                p.requires_grad_(False)
        self.model = torch.nn.ModuleDict({"unet": self.loaded.unet, "text_encoder": self.loaded.text_encoder})
        S, enc = cfg.sample_size, self.loaded.prompt_encoder
        images, ids, unknown, h = [], [], set(), hashlib.sha256()
        self.captions = [caption for _, caption in pairs]
        for path, caption in list(pairs) + list(prior):
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (S, S):
                    im = im.resize((S, S), Image.Resampling.BICUBIC)
                images.append(np.asarray(im))
            e = enc.encode(caption)
            unknown.update(e.unknown)
            ids.append(e.ids)
            h.update(path.name.encode() + b"\0" + caption.encode() + b"\0" + images[-1].tobytes())
        rng = np.random.default_rng(a.seed)
        n = len(pairs)
        order = rng.permutation(n)
        n_val = max(1, int(round(n * a.val_fraction))) if n > 1 else 0
        self.val_idx, self.train_idx = order[:n_val], order[n_val:] if n_val < n else order
        self.prior_idx = np.arange(n, len(images))  # the prior images: trained on, never validated
        self.x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        self.ids = torch.tensor(ids)
        self.empty = torch.tensor(enc.encode("").ids)
        self.coords = torch.from_numpy(coord_maps(S, cfg.coord_channels))
        self.acp = torch.from_numpy(alphas_cumprod(cfg.scheduler).astype(np.float64))
        self.unknown = sorted(unknown)
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

    def batch(self, rng):
        import torch

        idx = rng.choice(self.train_idx, size=self.a.batch)
        if len(self.prior_idx):  # prior preservation: a share of the batch from the prior images
            take = rng.random(self.a.batch) < self.a.prior_share
            idx[take] = rng.choice(self.prior_idx, size=int(take.sum()))
        idx = torch.from_numpy(idx)
        t = torch.from_numpy(rng.integers(0, len(self.acp), size=self.a.batch))
        noise = torch.from_numpy(rng.standard_normal((self.a.batch, *self.x0.shape[1:])).astype("float32"))
        drop = torch.from_numpy(rng.random(self.a.batch) < self.a.caption_dropout)
        return idx, t, noise, drop

    def loss(self, batch):
        return self._loss(*batch)

    def val_loss(self) -> float:
        """The loss on the held-out images at 8 fixed timesteps and noises (the same every evaluation)."""
        import numpy as np
        import torch

        idx = self.val_idx if len(self.val_idx) else self.train_idx[:1]
        rng = np.random.default_rng(12345)
        total = 0.0
        for t in np.linspace(50, len(self.acp) - 50, 8).astype(int):
            noise = torch.from_numpy(rng.standard_normal((len(idx), *self.x0.shape[1:])).astype("float32"))
            tt = torch.full((len(idx),), int(t))
            total += float(self._loss(torch.from_numpy(idx), tt, noise, torch.zeros(len(idx), dtype=torch.bool)))
        return total / 8

    def sample(self):
        """Up to four images in a row, for the first captions of the dataset (held-out ones first) with fixed seeds,
        so the same prompts show the adapter's progress at every evaluation; None with --sample-steps 0."""
        import numpy as np
        from PIL import Image

        from engine.diffusion import SampleSettings
        from plugins.image.pipeline import generate_images, torch_nets

        if not getattr(self.a, "sample_steps", 0):
            return None
        order = list(self.val_idx) + [i for i in self.train_idx if i not in set(self.val_idx)]
        captions = [self.captions[i] for i in order[:4]]
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
    if entry.family != "shapes-diffusion":
        raise UsageError(f"{entry.name} is a {entry.family} model; `studio finetune image` fine-tunes the shapes "
                         "diffusion family.")
    pairs = captioned_images(Path(a.data))
    prior = []
    if a.prior_data:
        prior = captioned_images(Path(a.prior_data))
        if not 0 < a.prior_share < 1:
            raise UsageError("--prior-share must be between 0 and 1.")
    out = Path(a.out).expanduser() if a.out else state.home() / "finetunes" / f"{entry.name}-{Path(a.data).name}"
    task = ImageTask(entry, pairs, a, prior=prior)
    note = f"; unknown words (learned as the unknown token): {', '.join(task.unknown)}" if task.unknown else ""
    print(f"fine-tuning {entry.name}: LoRA rank {a.rank} on {len(task.paths)} layers, "
          f"{sum(p.numel() for p in task.model.parameters() if p.requires_grad):,} trainable parameters; "
          f"{len(pairs)} images{note}; run folder {out}", file=sys.stderr)

    return run_command(task, a, out, "adapter.safetensors")
