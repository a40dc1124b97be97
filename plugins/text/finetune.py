"""`studio finetune text`: a LoRA on a text model, from a folder of .txt files or one file.

    studio finetune text --model shakespeare-llama --data psalms.txt --steps 300 --rank 8

Each document (a file) starts with the model's BOS token; the last ``--val-fraction`` of each document's tokens is
held out for validation. Training windows of ``--context`` tokens are drawn from the rest with the run's seed.
The adapter is saved in PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``), which
``peft.PeftModel.from_pretrained`` loads onto the transformers twin of the base model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.errors import UsageError
from engine.datasets import read_documents, text_files
from engine.finetune import Task, base_model, device_of, lora_options, parse_command, run_folder, start
from engine.generators import Option

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


MAX_BYTES = 64_000_000  # text a fine-tune reads (held in memory and tokenized whole)
VAL_TOKENS = 65_536  # held-out tokens scored at each evaluation

OPTIONS = lora_options(steps=300, lr=2e-3, batch=8, rank=8, alpha=16.0, dropout=0.05, every=50) + (
    Option("targets", "str", DEFAULT_TARGETS, "comma-separated names of the layers to adapt"),
    Option("context", "int", 128, "tokens per training window", min=2),
    Option("val_fraction", "float", 0.1, "the share of each document's end held out for validation", min=0.0,
           max=0.9),
)


def parse_args(argv):
    a = parse_command("text", __doc__.split("\n")[0], "a folder of .txt files, or one .txt file", OPTIONS, argv)
    if not 0 <= a.val_fraction < 1:
        raise UsageError("--val-fraction must be in [0, 1).")
    return a


def fingerprint(docs: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(docs):
        h.update(name.encode() + b"\0" + docs[name].encode() + b"\0")
    return h.hexdigest()


class TextTask(Task):
    def __init__(self, entry, docs: dict, a):
        import numpy as np
        import torch

        from engine.nn.lora import LoraSpec, wrap
        from plugins.text.models import load_model, load_tokenizer, read_config

        self.entry, self.a, self.device = entry, a, device_of(a)
        cfg = read_config(entry.path)
        self.tokenizer = load_tokenizer(entry.path)
        self.model = load_model(entry.path, entry.family, self.device, torch.float32)
        self.spec = LoraSpec(a.rank, a.alpha, a.dropout, tuple(t.strip() for t in a.targets.split(",") if t.strip()))
        self.paths = wrap(self.model, self.spec, seed=a.seed)
        bos = cfg.get("bos_token_id")
        train, val, self.val_chars = [], [], 0
        for name in sorted(docs):
            ids = self.tokenizer.encode(docs[name]).ids
            if isinstance(bos, int):
                ids = [bos] + ids
            cut = max(2, int(len(ids) * (1 - a.val_fraction)))
            train += ids[:cut]
            val += ids[cut - 1:]  # one token of overlap: the first held-out token is predicted from context
            self.val_chars += len(self.tokenizer.decode(ids[cut:]))
        self.train = np.asarray(train, dtype=np.int64)
        self.summary = f"{len(self.train):,} training tokens"
        self.val = np.asarray(val[:VAL_TOKENS], dtype=np.int64)  # each evaluation's cost stays bounded
        if len(val) > VAL_TOKENS:
            self.val_chars = len(self.tokenizer.decode(self.val[1:].tolist()))
        if a.context > self.model.max_positions - 1:
            raise UsageError(f"--context {a.context} is longer than {entry.name} reads ({self.model.max_positions - 1} "
                             "tokens and the next one); give a smaller --context.")
        self.context = a.context
        if len(self.train) < self.context + 2:
            raise UsageError(f"The training text is {len(self.train)} tokens, fewer than one --context window of "
                             f"{self.context}; give more text or a smaller --context.")
        self.recipe = {"kind": "text", "base_model": {"name": entry.name, "hash": entry.hash,
                                                      "family": entry.family},
                       "data": {"path": str(Path(a.data).expanduser().resolve()), "documents": len(docs),
                                "sha256": fingerprint(docs), "train_tokens": int(len(self.train)),
                                "val_tokens": int(len(self.val))},
                       "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
                                "targets": list(self.spec.targets), "layers": len(self.paths)},
                       "seed": a.seed}

    def batch(self, rng):
        import torch

        starts = rng.integers(0, len(self.train) - self.context - 1, size=self.a.batch)
        rows = [self.train[s:s + self.context + 1] for s in starts]
        return torch.from_numpy(__import__("numpy").stack(rows)).to(self.device)

    def loss(self, batch):
        import torch.nn.functional as F

        logits, _ = self.model(batch[:, :-1], use_cache=False)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    def val_nats(self) -> float:
        """Total nats over the held-out tokens (windows of ``context``, each token scored once)."""
        import torch
        import torch.nn.functional as F

        total, ids = 0.0, torch.from_numpy(self.val).to(self.device)
        for begin in range(0, len(ids) - 1, self.context):
            chunk = ids[begin:begin + self.context + 1][None]
            if chunk.shape[1] < 2:
                break
            logits, _ = self.model(chunk[:, :-1], use_cache=False)
            total += float(F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
        return total

    def val_loss(self) -> float:
        return self.val_nats() / max(1, len(self.val) - 1)

    def bits_per_char(self) -> float:
        import math

        return self.val_nats() / math.log(2) / max(1, self.val_chars)

    def sample(self):
        import torch

        ids = torch.tensor([[self.train[0]]], device=self.device)
        g = torch.Generator().manual_seed(0)
        past = None
        out = []
        with torch.no_grad():
            x = ids
            for _ in range(40):
                logits, past = self.model(x, past=past, logits_to_keep=1)
                probs = torch.softmax(logits[0, -1].float() / 0.8, -1)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=g))
                out.append(nxt)
                x = torch.tensor([[nxt]], device=self.device)
        return self.tokenizer.decode(out)

    def save(self, folder: Path) -> None:
        from engine.nn.lora import save_peft

        save_peft(self.model, folder, self.spec, base_model=self.entry.name)
        extra = {"base_model_hash": self.entry.hash, "recipe": self.recipe}
        (Path(folder) / "studio_adapter.json").write_text(json.dumps(extra, indent=2) + "\n")


def main(argv=None) -> int:
    a = parse_args(argv)
    entry = base_model(a, lambda e: e.generator == "text", "a text model")
    size = sum(f.stat().st_size for f in text_files(Path(a.data)))
    if size > MAX_BYTES:  # a 1 GB file ran the machine out of memory ("Killed"); 50 MB took 20 minutes
        raise UsageError(f"{a.data} holds {size / 1e6:,.0f} MB of text; the text fine-tuner reads at most "
                         f"{MAX_BYTES // 1_000_000} MB (a LoRA learns a style from a few MB): give a part of it.")
    return start(TextTask(entry, read_documents(Path(a.data)), a), a, run_folder(a, entry))
