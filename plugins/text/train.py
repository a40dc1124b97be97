"""Train a byte-level BPE tokenizer and a small Llama on a folder of .txt files.

    python -m plugins.text.train --data /work/shared/data/shakespeare --out resources/models/shakespeare-llama

Whole works are held out for validation (``--holdout``); the score is bits per character on them:
total nats over the held-out text / ln 2 / number of characters (each work scored as one document starting
from BOS, with a sliding window of ``--context`` tokens). Checkpoints (``--work``) resume with ``--resume``.
Whenever validation improves the model folder ``--out`` is rewritten (config.json, fp16 model.safetensors,
tokenizer.json, studio.json), so a usable model exists even if the run is cut short. A new run (not --resume)
refuses an ``--out`` that already holds files: it never replaces a model someone trained.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from engine.weights import load_pickle
from engine.finetune import add_flags
from engine.runfolder import refuse_to_replace, refuse_to_restart, resuming
from engine.generators import DEVICES
from engine.outputs import replacing

log = logging.getLogger("studio.train.text")
BOS = "<|endoftext|>"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="studio train text", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder of .txt files, one work each")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--work", default=None, help="checkpoint folder (default: runs/<out name>)")
    p.add_argument("--holdout", default="hamlet.txt,tempest.txt,sonnets.txt", help="comma-separated held-out files")
    add_flags(p, vocab_size=3072, d_model=256, layers=6, heads=8, kv_heads=4, ffn=688, context=256)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True, help="tie embeddings and head")
    p.add_argument("--dropout", type=float, default=0.1, help="residual dropout during training")
    add_flags(p, batch=16, steps=3000)
    p.add_argument("--minutes", type=float, default=0.0,
                   help="wall-clock budget: the schedule follows max(step/steps, elapsed/minutes) and stops at 1")
    add_flags(p, lr=2e-3, min_lr=1e-4, warmup=100, weight_decay=0.1, eval_every=250, ckpt_minutes=4.0)
    p.add_argument("--eval-stride", type=int, default=0, help="sliding-window stride for eval (default context/2)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="autocast dtype for training")
    add_flags(p, threads=1, seed=1337)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--title", default="Shakespeare (tiny Llama)")
    return p.parse_args(argv)


def read_corpus(folder: Path, holdout: list[str]):
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files in {folder}")
    missing = [h for h in holdout if not (folder / h).is_file()]
    if missing:
        raise SystemExit(f"held-out file(s) not found: {', '.join(missing)}")
    train = {f.name: f.read_text(encoding="utf-8") for f in files if f.name not in holdout}
    val = {h: (folder / h).read_text(encoding="utf-8") for h in holdout}
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def progress(step, elapsed, a) -> float:
    """Fraction of the run done: by steps, or by wall-clock time when --minutes is given (whichever is further)."""
    t = step / a.steps
    if a.minutes:
        t = max(t, elapsed / (60 * a.minutes))
    return min(1.0, t)


def lr_at(step, a, frac=None):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup)) if frac is None else frac
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * t))


def eval_windows(n: int, context: int, stride: int):
    """(begin, end, first scored target index) windows so that targets 1..n-1 are each scored exactly once."""
    out, scored, begin = [], 1, 0
    while scored < n:
        end = min(n, context + 1) if not out else min(n, scored + stride)
        begin = max(0, end - context - 1)
        out.append((begin, end, scored))
        scored = end
    return out


def evaluate_bpc(model, docs: list[list[int]], n_chars: int, context: int, stride: int, device, batch: int = 16) -> float:
    """Bits per character: every token of every document (after BOS) scored once, with up to ``context`` tokens
    of left context (windows advance by ``stride``; only the tokens new to a window are scored)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    nats = 0.0
    jobs = [(ids, w) for ids in docs for w in eval_windows(len(ids), context, stride)]
    jobs.sort(key=lambda j: j[1][1] - j[1][0])
    with torch.inference_mode():
        i = 0
        while i < len(jobs):
            length = jobs[i][1][1] - jobs[i][1][0]
            group = [j for j in jobs[i:i + batch] if j[1][1] - j[1][0] == length]
            i += len(group)
            seq = torch.tensor([ids[b:e] for ids, (b, e, _) in group], device=device)  # (B, length)
            logits, _ = model(seq[:, :-1], use_cache=False)
            lp = F.cross_entropy(logits.float().transpose(1, 2), seq[:, 1:], reduction="none")  # (B, length-1)
            for row, (_, (b, e, s)) in zip(lp, group):
                nats += row[s - b - 1:].sum().item()
    model.train()
    return nats / math.log(2) / n_chars


def save_model_folder(out: Path, model, cfg, tok, args, bpc, step, tokens_seen, elapsed):
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # as transformers saves tied weights
    with replacing(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    recipe = {k: v for k, v in vars(args).items() if k not in ("resume",)}
    studio = {
        "generator": "text", "family": "llama", "title": args.title,
        "description": f"A {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama trained from scratch on "
                       f"{len(args._train_names)} works of Shakespeare; writes pseudo-Shakespeare.",
        "recipe": {"command": "studio train text " + " ".join(args._argv), "args": recipe,
                   "train_works": args._train_names},
        "scores": {"heldout_bpc": round(bpc, 4), "heldout_works": args._holdout,
                   "bpc_method": f"total nats over held-out text / ln 2 / characters; sliding window "
                                 f"{args.context} tokens, stride {args.eval_stride or args.context // 2}",
                   "step": step, "train_tokens_seen": tokens_seen, "train_seconds": round(elapsed)},
    }
    (out / "studio.json").write_text(json.dumps(studio, indent=2) + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import numpy as np
    import torch

    from plugins.text.llama import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    work = Path(args.work) if args.work else Path("runs") / out.name
    refuse_to_restart(work / "checkpoint.pt", args.resume, "--work")
    refuse_to_replace(out, args.resume, "--out")
    work.mkdir(parents=True, exist_ok=True)
    holdout = [h.strip() for h in args.holdout.split(",") if h.strip()]
    args._holdout = holdout
    train_texts, val_texts = read_corpus(Path(args.data), holdout)
    args._train_names = sorted(train_texts)

    from tokenizers import Tokenizer
    tok_path = work / "tokenizer.json"
    if args.resume and tok_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(list(train_texts.values()), args.vocab_size)
        tok.save(str(tok_path))
    bos = tok.token_to_id(BOS)

    def encode(text):
        return [bos] + tok.encode(text).ids

    train_ids = np.concatenate([np.array(encode(t), dtype=np.int64) for t in train_texts.values()])
    val_docs = [encode(t) for t in val_texts.values()]
    val_chars = sum(len(t) for t in val_texts.values())
    train_chars = sum(len(t) for t in train_texts.values())
    log.info("train: %d works, %d chars, %d tokens (%.2f chars/token); held out: %s, %d chars",
             len(train_texts), train_chars, len(train_ids), train_chars / len(train_ids), ", ".join(holdout), val_chars)

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=args.d_model, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.context, rope_theta=10000.0,
                      tie_word_embeddings=args.tie, bos_token_id=bos, eos_token_id=bos)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device)
    model.model.dropout = args.dropout
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %s", n_params / 1e6, cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step, best, tokens_seen, elapsed = 0, float("inf"), 0, 0.0
    rng = np.random.default_rng(args.seed)
    ckpt = work / "checkpoint.pt"
    if args.resume and ckpt.is_file():
        state = load_pickle(ckpt, map_location=device)
        with resuming(ckpt):
            model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, best, tokens_seen, elapsed = state["step"], state["best"], state["tokens_seen"], state["elapsed"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d (best bpc %.4f)", ckpt, step, best)

    def save_ckpt():
        with replacing(ckpt) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                        "tokens_seen": tokens_seen, "elapsed": elapsed, "rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state()}, tmp)

    stride = args.eval_stride or args.context // 2
    T, B = args.context, args.batch
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    last_ckpt = time.time()
    t0 = time.time() - elapsed
    model.train()
    while progress(step, elapsed, args) < 1.0:
        lr = lr_at(step, args, progress(step, elapsed, args) if args.minutes else None)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - T - 1, size=B)
        batch = torch.from_numpy(np.stack([train_ids[s:s + T + 1] for s in starts])).to(device)
        with autocast:
            logits, _ = model(batch[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += B * T
        elapsed = time.time() - t0
        if step % 10 == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.2fs/step elapsed %.1f min", step, args.steps, loss.item(), lr,
                     elapsed / max(1, step), elapsed / 60)
        done = progress(step, elapsed, args) >= 1.0
        if step % args.eval_every == 0 or done:
            te = time.time()
            bpc = evaluate_bpc(model, val_docs, val_chars, T, stride, device)
            log.info("step %d held-out %.4f bits/char (eval %.0fs)%s", step, bpc, time.time() - te,
                     " (best so far, model folder written)" if bpc < best else "")
            if bpc < best:
                best = bpc
                save_model_folder(out, model, cfg, tok, args, bpc, step, tokens_seen, elapsed)
            save_ckpt()
            last_ckpt = time.time()
        elif time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_ckpt()
            last_ckpt = time.time()
    log.info("done: best held-out %.4f bits/char; model folder %s", best, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
