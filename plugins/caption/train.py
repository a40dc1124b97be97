"""Train a ViT + GPT-2 captioner on freshly rendered captioned-shapes scenes (``studio train caption``).

Every step renders a new batch with the spec's augmentations (shift up to 0.04 S, size change up to 10 %,
anti-aliasing on half the time); batch ``n`` is drawn from ``SeedSequence(seed, spawn_key=(n,))``, so a
resumed run sees exactly the data it would have seen. Checkpoints (model + AdamW state, safetensors) go to
``OUT/checkpoint.safetensors`` with ``OUT/checkpoint.json``; ``--export DIR`` writes a float16 model folder.

    python -m plugins.caption.train --out runs/caption --steps 6000 [--resume] [--export resources/models/shapes-captioner]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from engine.finetune import add_flags
from engine.runfolder import refuse_to_replace, refuse_to_restart, resuming
from engine.generators import DEVICES
from engine.outputs import atomic_write_bytes, replacing

log = logging.getLogger("plugins.caption.train")

EVAL_ENTROPY = 20_261_126  # validation scenes during training use their own seed stream (never a training seed)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="studio train caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/caption", help="folder for checkpoints and logs")
    add_flags(p, steps=6000, batch_size=64, lr=1e-3, warmup=200, weight_decay=0.01, seed=0, image_size=32,
              patch_size=4, enc_hidden=128, enc_layers=3, enc_heads=4, dec_embd=128, dec_layers=2, dec_heads=4)
    p.add_argument("--pos-init", default="sincos", choices=("sincos", "random"),
                   help="initial ViT position embeddings: 2-D sine-cosine codes or small random values")
    p.add_argument("--hard-fraction", type=float, default=0.0,
                   help="share of each batch drawn as small circles / small squares (the hardest pair)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_flags(p, log_every=50, ckpt_every=200, eval_every=500, eval_size=200)
    p.add_argument("--export", default=None, help="write a float16 model folder here at the end")
    p.add_argument("--export-only", action="store_true", help="export the checkpoint in OUT without training")
    return p.parse_args(argv)


def training_batch(step: int, seed: int, batch: int, S: int, hard_fraction: float = 0.0):
    """(uint8 images (B, S, S, 3), captions) of training batch ``step``.

    ``hard_fraction`` of the batch (rounded down) are small circles and small squares, the pair a small model
    confuses longest; they get the same augmentations as the rest."""
    from engine.shapes import sample_training_example

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(step,)))
    n_hard = int(hard_fraction * batch)
    pairs = [sample_training_example(rng, S) for _ in range(batch - n_hard)]
    pairs += [hard_example(rng, S) for _ in range(n_hard)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def hard_example(rng, S: int):
    """A small circle or small square, augmented as ``engine.shapes.sample_training_example`` does."""
    import dataclasses

    from engine.shapes import caption, render, sample_scene

    scene = dataclasses.replace(sample_scene(rng), size="small", kind=("circle", "square")[rng.integers(2)])
    shift = tuple(rng.uniform(-0.04 * S, 0.04 * S, size=2))
    scale = float(rng.uniform(0.9, 1.1))
    return render(scene, S, antialias=bool(rng.integers(2)), shift=shift, scale=scale), caption(scene)


def validation_set(n: int, S: int):
    """``n`` fixed scenes, each rendered plainly and anti-aliased, with random augmentation (own seed stream)."""
    from engine.shapes import caption, render, sample_scene

    rng = np.random.default_rng(np.random.SeedSequence(EVAL_ENTROPY))
    images, captions = [], []
    for i in range(n):
        scene = sample_scene(rng)
        shift = tuple(rng.uniform(-0.04 * S, 0.04 * S, size=2))
        scale = float(rng.uniform(0.9, 1.1))
        images.append(render(scene, S, antialias=bool(i % 2), shift=shift, scale=scale))
        captions.append(caption(scene))
    return np.stack(images), captions


def to_pixels(images, device, dtype=None):
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W) float tensor, as engine.images.to_pixel_values does."""
    import torch

    x = torch.as_tensor(images, device=device).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.5
    return x if dtype is None else x.to(dtype)


def encode_captions(tokenizer, captions, bos, eos, pad, device):
    """Decoder inputs [bos, w1..wn] and labels [w1..wn, eos], padded (labels -100 on padding)."""
    import torch

    seqs = [tokenizer.encode(c).ids for c in captions]
    T = max(len(s) for s in seqs) + 1
    inputs = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, : len(s) + 1] = torch.tensor([bos] + s)
        labels[i, : len(s) + 1] = torch.tensor(s + [eos])
    return inputs.to(device), labels.to(device)


def batch_greedy(model, pixels, bos, eos, max_len: int = 20):
    """Greedy token ids for a batch (no cache: short captions), used for the validation score while training."""
    import torch

    with torch.no_grad():
        enc = model.encode(pixels)
        ids = torch.full((pixels.shape[0], 1), bos, dtype=torch.long, device=pixels.device)
        finished = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
        for _ in range(max_len):
            logits, _ = model.decoder(ids, encoder_hidden_states=enc, use_cache=False, logits_to_keep=1)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            finished |= nxt == eos
            if finished.all():
                break
    out = []
    for row in ids[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def exact_match(model, tokenizer, images, captions, bos, eos, device, batch=100) -> float:
    hits = 0
    for i in range(0, len(captions), batch):
        ids = batch_greedy(model, to_pixels(images[i: i + batch], device), bos, eos)
        hits += sum(tokenizer.decode(t) == c for t, c in zip(ids, captions[i: i + batch]))
    return hits / len(captions)


def save_checkpoint(out: Path, model, opt, step: int, args, extra: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()
               if k != "decoder.lm_head.weight"}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"opt.exp_avg.{names[id(p)]}"] = st["exp_avg"].contiguous()
                tensors[f"opt.exp_avg_sq.{names[id(p)]}"] = st["exp_avg_sq"].contiguous()
    meta = {**extra, "step": step, "args": vars(args), "adam_step": _adam_step(opt)}
    with replacing(out / "checkpoint.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_bytes(out / "checkpoint.json", json.dumps(meta, indent=1).encode())


def _adam_step(opt) -> int:
    for st in opt.state.values():
        return int(st["step"])
    return 0


def load_checkpoint(out: Path, model, opt, device) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoint.safetensors"), device=str(device))
    meta = json.loads((out / "checkpoint.json").read_text())
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"]
    model.load_state_dict(state, strict=True)
    if opt is not None:
        for name, p in model.named_parameters():
            if f"opt.exp_avg.{name}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(meta["adam_step"])),
                                "exp_avg": tensors[f"opt.exp_avg.{name}"],
                                "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"]}
    return meta


def build_config(args, tokenizer):
    from plugins.caption.model import CaptionConfig
    from plugins.caption.tokenizer import BOS, EOS, PAD
    from plugins.caption.vit import ViTConfig
    from engine.nn.gpt2 import GPT2Config

    bos, eos, pad = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))
    enc = ViTConfig(hidden_size=args.enc_hidden, num_hidden_layers=args.enc_layers,
                    num_attention_heads=args.enc_heads, intermediate_size=4 * args.enc_hidden,
                    image_size=args.image_size, patch_size=args.patch_size)
    dec = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=32, n_embd=args.dec_embd,
                     n_layer=args.dec_layers, n_head=args.dec_heads, add_cross_attention=True,
                     bos_token_id=bos, eos_token_id=eos)
    return CaptionConfig(enc, dec, decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def export(model, tokenizer, folder: Path, args, meta: dict) -> None:
    """A float16 model folder: config.json, model.safetensors, tokenizer.json, preprocessor_config.json, studio.json."""
    from plugins.caption.model import save_folder

    save_folder(model, tokenizer, folder)
    studio_path = folder / "studio.json"
    studio = json.loads(studio_path.read_text()) if studio_path.is_file() else {}
    trained_with = meta.get("args") or vars(args)  # the training run's settings, not an --export-only call's
    recipe_args = {k: v for k, v in trained_with.items() if k not in ("export", "export_only", "resume", "out")}
    studio.update({
        "generator": "caption", "family": "vision-encoder-decoder", "title": "Shapes captioner",
        "description": "Names the shape, colour, size, position and background of a captioned-shapes scene "
                       "(ViT encoder + GPT-2 decoder, trained on rendered scenes).",
        "recipe": {"command": "python -m plugins.caption.train " + " ".join(_argv_of(recipe_args)),
                   "data": "fresh renders of docs/shapes_spec.md with shift <= 0.04 S, size +-10 %, "
                           "anti-aliasing on half the time; batch n from SeedSequence(seed, spawn_key=(n,))",
                   "hyperparameters": recipe_args, "steps_trained": meta.get("step"),
                   "segments": meta.get("segments", []),
                   "final_loss": meta.get("loss"), "train_seconds": meta.get("train_seconds")},
    })
    studio["scores"] = {}  # new weights: measure again with benchmarks/eval_caption.py --update-studio
    studio_path.write_text(json.dumps(studio, indent=2) + "\n")


def _argv_of(d: dict) -> list:
    out = []
    for k, v in d.items():
        if k in ("device", "threads", "log_every", "ckpt_every", "eval_every", "eval_size"):
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import torch
    import torch.nn.functional as F

    from plugins.caption.model import CaptionModel
    from plugins.caption.tokenizer import shapes_tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    out = Path(args.out)
    refuse_to_restart(out / "checkpoint.safetensors", args.resume or args.export_only)
    if args.export:
        refuse_to_replace(Path(args.export), args.resume or args.export_only, "--export")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = shapes_tokenizer()
    config = build_config(args, tokenizer)
    torch.manual_seed(args.seed)
    model = CaptionModel(config)
    if args.pos_init == "sincos":
        from plugins.caption.vit import sincos_position_embeddings

        grid = args.image_size // args.patch_size
        with torch.no_grad():
            model.encoder.embeddings.position_embeddings.copy_(sincos_position_embeddings(grid, args.enc_hidden))
    model = model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    start, meta = 0, {}
    if args.resume or args.export_only:
        if not (out / "checkpoint.safetensors").is_file():
            print(f"error: no checkpoint in {out} to resume from", file=sys.stderr)
            return 2
        with resuming(out / "checkpoint.safetensors"):
            meta = load_checkpoint(out, model, opt, device)
        start = meta["step"]
        log.info("resumed from step %d", start)
    if not args.export_only:  # which settings trained which steps (a resumed run may change --steps)
        meta["segments"] = meta.get("segments", []) + [{"from_step": start, "steps": args.steps, "lr": args.lr,
                                                        "batch_size": args.batch_size,
                                                        "hard_fraction": args.hard_fraction}]
        meta["args"] = vars(args)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, device %s, threads %d", n_params, device, args.threads)
    bos, eos, pad = config.decoder_start_token_id, config.eos_token_id, config.pad_token_id
    val_images, val_captions = validation_set(args.eval_size, args.image_size)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    t0, seen_time = time.time(), meta.get("train_seconds", 0.0)
    loss_avg = meta.get("loss")
    step = start
    model.train()
    for step in range(start, 0 if args.export_only else args.steps):
        images, captions = training_batch(step, args.seed, args.batch_size, args.image_size, args.hard_fraction)
        pixels = to_pixels(images, device)
        inputs, labels = encode_captions(tokenizer, captions, bos, eos, pad, device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(pixels, inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            el = time.time() - t0
            rate = (done - start) / max(el, 1e-9)
            log.info("step %d/%d loss %.4f lr %.2e %.2f steps/s eta %.0f min", done, args.steps, loss_avg,
                     lr_at(step), rate, (args.steps - done) / max(rate, 1e-9) / 60)
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            acc = exact_match(model, tokenizer, val_images, val_captions, bos, eos, device)
            model.train()
            log.info("step %d validation exact match %.3f (%d scenes)", done, acc, len(val_captions))
            meta["val_exact"] = acc
        if done % args.ckpt_every == 0 or done == args.steps:
            meta.update(loss=loss_avg, train_seconds=seen_time + time.time() - t0)
            save_checkpoint(out, model, opt, done, args, meta)
    if start < args.steps and not args.export_only:
        step = args.steps
    meta.update(step=max(step, start), loss=loss_avg, train_seconds=seen_time + time.time() - t0)
    if args.export:
        model.eval()
        export(model.cpu(), tokenizer, Path(args.export), args, meta)
        log.info("exported to %s", args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
