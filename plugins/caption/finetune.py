"""`studio finetune caption`: a LoRA on a captioner from a folder of captioned images.

    studio finetune caption --model shapes-captioner --data stars/ --prior-data shapes/ --steps 300

The folder holds images with a same-named ``.txt`` caption beside each (the image fine-tuner's convention).
Adapters go on the text decoder's attention, cross-attention and feed-forward layers (``--targets`` adds the
vision encoder's: on the shapes captioner that taught stars less well, docs/benchmarks_finetune.md). Words a word-level
vocabulary lacks (the shapes captioner has never seen "star") become new tokens: their rows of the decoder's
embedding and output layer train with the adapter (PEFT's trainable tokens), and the grown ``tokenizer.json`` is
saved in the adapter folder. Sub-word vocabularies (BLIP's, GPT-2's) spell a new word from pieces they have.
The adapter is PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``); transformers' twin of the
base loads it with ``PeftModel.from_pretrained`` after ``model.decoder.resize_token_embeddings(len(tokenizer))``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.errors import UsageError
from engine.finetune import (Task, base_model, captioned_data, device_of, lora_options, parse_command, run_folder,
                             start)
from engine.generators import Option

DEFAULT_TARGETS = "c_attn,q_attn,c_proj,c_fc,query,key,value"  # the decoder's (GPT-2's, BERT's): see docs

OPTIONS = lora_options(steps=300, lr=2e-3, batch=32, rank=8, alpha=16.0, dropout=0.0, every=50) + (
    Option("targets", "str", DEFAULT_TARGETS, "comma-separated names of the layers to adapt: by default the text "
           "decoder's (GPT-2's and BERT's names; a name the model lacks is passed over); add q_proj,k_proj,v_proj,"
           "o_proj,fc1,fc2 to adapt a ViT encoder too"),
    Option("val_fraction", "float", 0.1, "share of the images held out for validation", min=0.0, max=0.9),
    Option("prior_data", "str", "", "a folder of captioned images of what the model already describes, mixed "
           "into every batch so that it does not forget them (prior preservation; empty: none)"),
    Option("prior_share", "float", 0.5, "share of each batch drawn from the prior images", min=0.0, max=1.0),
    Option("shift", "int", 0, "move each training image by up to this many pixels (edges repeated), drawn anew "
           "every step: a little augmentation for a small dataset (0: none)", min=0, max=64),
)


def parse_args(argv):
    return parse_command("caption", __doc__.split("\n")[0], "a folder of images with same-named .txt captions",
                         OPTIONS, argv)


def _vocab_layers(model, vocab: int) -> list:
    """The decoder's input embedding and output layer: the paths of its layers with one row per token."""
    import torch.nn as nn

    prefix = next(n for n, m in model.named_modules() if m is model.decoder)
    return [f"{prefix}.{p}" for p, m in model.decoder.named_modules()
            if isinstance(m, (nn.Embedding, nn.Linear)) and m.weight.shape[0] == vocab]


class CaptionTask(Task):
    def __init__(self, entry, pairs: list, a, prior: list = ()):
        import numpy as np
        import torch

        from engine.images import load_image
        from engine.nn.lora import LoraSpec, wrap
        from engine.nn.new_tokens import add_token_rows
        from plugins.caption.model import load_caption_model
        from plugins.caption.pipeline import Preprocess
        from plugins.caption.tokenizer import add_words, load_tokenizer

        self.entry, self.a, self.device = entry, a, device_of(a)
        self.model = load_caption_model(entry.path, self.device, torch.float32)
        cfg = self.model.config
        self.start_id, self.eos_id, pad = cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id
        captions = [c for _, c in list(pairs) + list(prior)]
        self.tokenizer, self.new_words = add_words(load_tokenizer(entry.path), captions)
        targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
        self.spec = LoraSpec(a.rank, a.alpha, a.dropout, targets)
        self.paths = wrap(self.model, self.spec, seed=a.seed)
        if self.new_words:
            ids = [self.tokenizer.token_to_id(w) for w in self.new_words]
            layers = _vocab_layers(self.model, cfg.decoder.vocab_size)
            if not layers:
                raise UsageError(f"{entry.name}'s decoder has no embedding of {cfg.decoder.vocab_size} rows to add "
                                 f"the new words ({', '.join(self.new_words)}) to.")
            add_token_rows(self.model, layers, ids, train=True)
        preprocess = Preprocess.from_folder(entry.path, cfg.encoder.image_size)
        pixels, seqs, h = [], [], hashlib.sha256()
        limit = cfg.decoder.n_positions if hasattr(cfg.decoder, "n_positions") else cfg.decoder.max_position_embeddings
        for path, caption in list(pairs) + list(prior):
            pixels.append(preprocess(load_image(path))[0])
            ids = self.tokenizer.encode(caption, add_special_tokens=False).ids
            if len(ids) + 1 > limit:
                raise UsageError(f"The caption of {path.name} is {len(ids)} tokens; {entry.name} writes at most "
                                 f"{limit - 1}. Shorten it.")
            seqs.append(ids)
            h.update(path.name.encode() + b"\0" + caption.encode() + b"\0" + pixels[-1].tobytes())
        T = max(len(s) for s in seqs) + 1
        self.inputs = torch.full((len(seqs), T), pad, dtype=torch.long)
        self.labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            self.inputs[i, : len(s) + 1] = torch.tensor([self.start_id] + s)
            self.labels[i, : len(s) + 1] = torch.tensor(s + [self.eos_id])
        self.pixels = torch.from_numpy(np.stack(pixels)).to(self.device)
        self.inputs, self.labels = self.inputs.to(self.device), self.labels.to(self.device)
        self.captions = captions
        n = len(pairs)
        self.summary = f"{n} images" + (f"; new words: {', '.join(self.new_words)}" if self.new_words else "")
        self.split(n, a.val_fraction, a.seed)
        self.prior_idx = np.arange(n, len(seqs))
        self.recipe = {"kind": "caption", "base_model": {"name": entry.name, "hash": entry.hash,
                                                         "family": entry.family},
                       "data": {"path": str(Path(a.data).expanduser().resolve()), "images": n, "shift": a.shift,
                                "prior_images": len(prior), "prior_share": a.prior_share if len(prior) else 0.0,
                                "sha256": h.hexdigest(), "new_words": self.new_words,
                                "train": int(len(self.train_idx)), "val": int(len(self.val_idx))},
                       "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout, "targets": list(targets),
                                "layers": len(self.paths), "format": "peft"}, "seed": a.seed}

    def batch(self, rng):
        import torch

        idx = self.draw(rng, self.a.batch, self.a.prior_share)
        k = getattr(self.a, "shift", 0)
        offsets = rng.integers(0, 2 * k + 1, size=(self.a.batch, 2)) if k else None
        return torch.from_numpy(idx).to(self.device), offsets

    def _shifted(self, idx, offsets):
        """The images ``idx``, each moved by its (dy, dx) offset in [0, 2k] minus k, the edges repeated."""
        import torch
        import torch.nn.functional as F

        x = self.pixels[idx]
        if offsets is None:
            return x
        k, (H, W) = self.a.shift, x.shape[2:]
        padded = F.pad(x, (k, k, k, k), mode="replicate")
        return torch.stack([padded[i, :, dy:dy + H, dx:dx + W] for i, (dy, dx) in enumerate(offsets)])

    def _loss(self, idx, reduction="mean", offsets=None):
        import torch.nn.functional as F

        labels = self.labels[idx]
        keep = int((labels != -100).sum(1).max())  # trim the padding every row of this batch has
        logits = self.model(self._shifted(idx, offsets), self.inputs[idx, :keep])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, :keep].reshape(-1),
                               ignore_index=-100, reduction=reduction)

    def loss(self, batch):
        return self._loss(batch[0], offsets=batch[1])

    def val_loss(self) -> float:
        import torch

        idx = torch.from_numpy(self.val_idx if len(self.val_idx) else self.train_idx[:1]).to(self.device)
        total = sum(float(self._loss(idx[i:i + 64], "sum")) for i in range(0, len(idx), 64))
        return total / max(1, int((self.labels[idx] != -100).sum()))

    def captions_of(self, idx) -> list:
        """Greedy captions of images ``idx`` through the generator's own decoding loop."""
        from plugins.caption.decode import greedy_batch
        from plugins.caption.model import TorchCaptionRunner

        hyps = greedy_batch(TorchCaptionRunner(self.model), self.pixels[idx].cpu().numpy(), self.start_id, self.eos_id,
                            self.inputs.shape[1] + 4)
        return [self.tokenizer.decode([t for t in h.tokens if t != self.eos_id], skip_special_tokens=True).strip()
                for h in hyps]

    def sample(self):
        """The captions of up to four images (held-out ones first) next to their true captions."""
        idx = self.shown(4)
        return "\n".join(f"{'ok  ' if got == self.captions[i] else 'not '}{got}   (true: {self.captions[i]})"
                         for i, got in zip(idx, self.captions_of(idx)))

    def save(self, folder: Path) -> None:
        from engine.nn.lora import save_peft

        folder = Path(folder)
        save_peft(self.model, folder, self.spec, base_model=self.entry.name, task_type=None)
        if self.new_words:  # the grown vocabulary the new rows belong to
            self.tokenizer.save(str(folder / "tokenizer.json"))
        extra = {"base_model_hash": self.entry.hash, "new_words": self.new_words, "recipe": self.recipe}
        (folder / "studio_adapter.json").write_text(json.dumps(extra, indent=2) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    entry = base_model(a, lambda e: e.generator == "caption", "a caption model")
    pairs, prior = captioned_data(a)
    return start(CaptionTask(entry, pairs, a, prior=prior), a, run_folder(a, entry))
