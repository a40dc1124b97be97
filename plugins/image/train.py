"""Train the text-to-image model on the captioned-shapes world (``studio train image``).

Text encoder and U-Net are trained together from scratch on freshly rendered scenes (augmented as the
spec allows). Recipe: v-prediction on a cosine schedule, min-SNR-gamma loss weights, caption dropout for
classifier-free guidance, AdamW with warmup and cosine decay, an EMA of the weights for sampling.
Every ``--eval-every`` steps the EMA model draws ``--eval-n`` captions with DPM-Solver++ (20 steps) and
the analyzer scores them; when the all-five share improves, the EMA weights are written to ``--export``.
Checkpoints (``--out``/ckpt.pt) are written every few minutes; ``--resume`` continues from one.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from engine.weights import load_pickle
from engine.finetune import add_flags
from engine.runfolder import refuse_to_replace, refuse_to_restart
from engine.generators import DEVICES
from engine.outputs import replacing

log = logging.getLogger("studio.train.image")


def default_config(channels=(32, 64, 64), text_dim=64, text_layers=2, heads=4, size=32, film="scale_shift",
                   class_labels="mean") -> dict:
    from plugins.image.tokenizer import shapes_tokenizer
    vocab = shapes_tokenizer().get_vocab_size()
    n = len(channels)
    return {
        "model_type": "studio-text-to-image",
        "sample_size": size,
        "coord_channels": 2,
        "class_labels": class_labels,
        "unet": {
            "_class_name": "UNet2DConditionModel", "sample_size": size, "in_channels": 5, "out_channels": 3,
            "down_block_types": ["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": list(channels), "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": text_dim, "attention_head_dim": heads,
            "class_embed_type": "projection", "projection_class_embeddings_input_dim": text_dim,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
            "resnet_time_scale_shift": film,
        },
        "text_encoder": {
            "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": text_dim,
            "intermediate_size": 2 * text_dim, "num_hidden_layers": text_layers, "num_attention_heads": heads,
            "max_position_embeddings": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
        },
        "scheduler": {
            "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.0,
        },
    }


def make_batch(rng, batch: int, size: int, encoder, dropout: float):
    """(x0 (B, 3, S, S) in [-1, 1], ids (B, T)) of rendered scenes; captions dropped to "" with p=dropout."""
    import torch
    from engine.shapes import sample_training_example
    imgs, ids = [], []
    for _ in range(batch):
        img, cap = sample_training_example(rng, size)
        imgs.append(img)
        ids.append(encoder.encode("" if rng.random() < dropout else cap).ids)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(ids)


def eval_captions(n: int, seed0: int = 0) -> list:
    """``n`` fixed captions: caption i is the scene sampled with seed seed0 + i."""
    from engine.shapes import caption, sample_scene
    return [caption(sample_scene(np.random.default_rng(seed0 + i))) for i in range(n)]


def score_images(images: np.ndarray, captions: list) -> dict:
    """Analyzer scores: share of images with all five attributes right, and each attribute's share."""
    from engine.shapes import analyze, parse_caption
    keys = ("size", "colour", "kind", "position", "background")
    hits = {k: 0 for k in keys}
    allright = 0
    for img, cap in zip(images, captions):
        want, got = parse_caption(cap), analyze(img)
        ok = [got is not None and getattr(got, k) == getattr(want, k) for k in keys]
        for k, o in zip(keys, ok):
            hits[k] += o
        allright += all(ok)
    n = max(1, len(captions))
    return {"all_five": allright / n, **{k: v / n for k, v in hits.items()}}


def generate_batch(unet, text, cfg_model, captions, steps=20, sampler="dpmpp_2m", guidance=1.5, seed=0,
                   encoder=None, batch=100, device="cpu"):
    """Images (N, S, S, 3) uint8 for ``captions`` with the torch modules (seeded; the modules on ``device``)."""
    from engine.diffusion import SampleSettings, TorchArrays
    from plugins.image.model import ImageModelConfig
    from plugins.image.pipeline import ImageNets, TorchDenoiser, TorchTextEncoder, generate_images
    cfg = cfg_model if isinstance(cfg_model, ImageModelConfig) else ImageModelConfig.from_dict(cfg_model)
    nets = ImageNets(TorchArrays(), TorchTextEncoder(text, device), TorchDenoiser(unet, device), cfg.sample_size,
                     cfg.coord_channels, getattr(cfg, "class_labels", "pooled"), cfg.scheduler, encoder)
    return generate_images(nets, captions, SampleSettings(steps, guidance, sampler), seed, batch)


def _adapt(own: dict, src: dict) -> dict:
    """``src`` tensors reshaped into ``own``: same shapes copy; a (C, T) time_emb_proj into a (2C, T) one
    becomes its shift half, with a zero scale half (so the warm-started block starts as FiLM with scale 1)."""
    out = {}
    for k, v in own.items():
        w = src.get(k)
        if w is not None and w.shape == v.shape:
            out[k] = w
        elif w is not None and "time_emb_proj" in k and v.shape[0] == 2 * w.shape[0]:
            out[k] = torch_cat_zero_first(w)
        else:
            out[k] = v
    return out


def torch_cat_zero_first(w):
    import torch
    return torch.cat([torch.zeros_like(w), w], dim=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="studio train image", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/image", help="training folder (checkpoints, log)")
    p.add_argument("--export", default=None, help="model folder to write the best EMA weights to")
    add_flags(p, steps=4000, batch=64, lr=2e-3, warmup=200, ema=0.999, min_snr=5.0)
    p.add_argument("--loss-weight", default="min_snr_plus1", choices=("min_snr", "min_snr_plus1"),
                   help="min_snr: x0-loss weight min(snr, g) (Hang et al.); min_snr_plus1: min(snr, g) + 1, which "
                        "keeps the high-noise steps (where the layout is decided) at full v-loss weight")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--channels", default="32,64,64")
    add_flags(p, text_dim=64, text_layers=2)
    p.add_argument("--film", default="scale_shift", choices=("default", "scale_shift"),
                   help="how the time+text embedding enters each resnet: added, or scale and shift after norm2")
    p.add_argument("--class-labels", default="mean", choices=("pooled", "mean"),
                   help="the U-Net's class embedding input: the pooled EOS state or the mean hidden state")
    p.add_argument("--init-from", default=None, help="warm start from another run's ckpt.pt (matching tensors are "
                   "copied; a default-FiLM time_emb_proj becomes the shift half of a scale_shift one)")
    add_flags(p, eval_every=250, eval_n=50)
    p.add_argument("--guidance", type=float, default=1.5, help="guidance of the in-training evaluations")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="write the EMA weights of --out/ckpt.pt to --export and exit (no training)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    add_flags(p, threads=1, seed=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch
    import torch.nn.functional as F
    from plugins.image import model as M
    from engine.diffusion.schedulers.common import alphas_cumprod
    from plugins.image.tokenizer import PromptEncoder, shapes_tokenizer

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    refuse_to_restart(ckpt_path, args.resume or args.export_only)
    if args.export:
        refuse_to_replace(Path(args.export), args.resume or args.export_only, "--export")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = shapes_tokenizer()

    if args.resume and ckpt_path.exists():
        ck = load_pickle(ckpt_path)
        config = ck["config"]
        hp = {**ck["args"], "steps": args.steps, "resumed_at": ck["args"].get("resumed_at", []) + [ck["step"]]}
        schedule = dict(hp.get("loss_weight_from_step", {"0": hp.get("loss_weight", "min_snr")}))
        if list(schedule.values())[-1] != args.loss_weight:
            schedule[str(ck["step"])] = args.loss_weight
        hp["loss_weight_from_step"], hp["loss_weight"] = schedule, args.loss_weight
        log.info("resuming from %s at step %d", ckpt_path, ck["step"])
    else:
        ck, hp = None, vars(args)
        config = default_config(tuple(int(c) for c in args.channels.split(",")), args.text_dim, args.text_layers,
                                film=args.film, class_labels=args.class_labels)
    cfg = M.ImageModelConfig.from_dict(config)
    encoder = PromptEncoder(tokenizer, cfg.text.max_position_embeddings)
    torch.manual_seed(args.seed)
    unet, text = M.build(cfg)
    unet.to(device), text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    step, best, curve = 0, -1.0, []
    rng = np.random.default_rng(args.seed)
    if ck is not None:
        unet.load_state_dict(ck["unet"]), text.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"]), ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        step, best, curve = ck["step"], ck["best"], ck["curve"]
        rng = np.random.default_rng([args.seed, step])
    elif args.init_from:
        src = load_pickle(args.init_from)
        for mod, ema, key in ((unet, ema_unet, "unet"), (text, ema_text, "text")):
            for target, state in ((mod, src[key]), (ema, src["ema_" + key])):
                target.load_state_dict(_adapt(target.state_dict(), state))
        log.info("warm start from %s (step %d)", args.init_from, src["step"])
    if args.export_only:
        if ck is None or not args.export:
            raise SystemExit("--export-only needs --resume with an existing --out/ckpt.pt and an --export folder")
        old = Path(args.export) / "studio.json"
        studio = json.loads(old.read_text()) if old.exists() else {"generator": "image", "family": "shapes-diffusion"}
        studio.setdefault("recipe", {})["exported_step"] = step
        M.save(Path(args.export), config, ema_unet, ema_text, tokenizer, studio)
        log.info("exported the EMA weights of step %d to %s", step, args.export)
        return 0
    n_params = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text.parameters())
    log.info("U-Net %.2fM params, text encoder %.2fM params, device %s", n_params[0] / 1e6, n_params[1] / 1e6, device)

    acp = torch.from_numpy(alphas_cumprod(cfg.scheduler).astype(np.float64))
    snr = acp / (1 - acp)
    from plugins.image.pipeline import class_vector, coord_maps
    coords = torch.from_numpy(coord_maps(cfg.sample_size, cfg.coord_channels)).to(device)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        frac = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def save_ckpt():
        with replacing(ckpt_path) as tmp:
            torch.save({"config": config, "args": hp, "step": step, "best": best, "curve": curve,
                        "unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict()}, tmp)

    def evaluate():
        nonlocal best
        t0 = time.perf_counter()
        caps = eval_captions(args.eval_n, seed0=10_000)
        imgs = generate_batch(ema_unet, ema_text, cfg, caps, 20, "dpmpp_2m", args.guidance, seed=0, encoder=encoder,
                              device=device)
        s = score_images(imgs, caps)
        curve.append({"step": step, **{k: round(v, 4) for k, v in s.items()}})
        log.info("eval step %d: all five %.3f | size %.2f colour %.2f kind %.2f position %.2f background %.2f (%.0fs)",
                 step, s["all_five"], s["size"], s["colour"], s["kind"], s["position"], s["background"],
                 time.perf_counter() - t0)
        (out / "curve.json").write_text(json.dumps(curve, indent=1))
        key = s["all_five"] + 1e-3 * sum(s.values())
        if key > best:
            best = key
            if args.export:
                studio = {"generator": "image", "family": "shapes-diffusion", "title": "Shapes diffusion",
                          "description": "A tiny text-to-image model of the captioned-shapes world (32x32).",
                          "recipe": {"command": "studio train image " + " ".join(sys.argv[1:] if argv is None else argv),
                                     "step": step, **{k: v for k, v in hp.items() if k not in ("out", "export")}},
                          "sampling": {"sampler": "dpmpp_2m", "steps": 20, "guidance": args.guidance},
                          "scores": {"eval_during_training": curve[-1], "eval_n": args.eval_n,
                                     "sampler": "dpmpp_2m", "steps": 20, "guidance": args.guidance},
                          "curve": curve}
                M.save(Path(args.export), config, ema_unet, ema_text, tokenizer, studio)
                log.info("exported EMA weights of step %d to %s", step, args.export)

    last_ckpt = time.time()
    t_log, loss_acc = time.perf_counter(), 0.0
    unet.train(), text.train()
    while step < args.steps:
        x0, ids = make_batch(rng, args.batch, cfg.sample_size, encoder, args.caption_dropout)
        x0, ids = x0.to(device), ids.to(device)
        t = torch.randint(0, len(acp), (args.batch,))
        a = acp[t].float().to(device)[:, None, None, None]
        noise = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        hidden, pooled = text(ids)
        pooled = class_vector(hidden, pooled, ids, cfg.class_labels)
        pred = unet(torch.cat([xt, coords.expand(args.batch, -1, -1, -1)], 1), t.to(device), hidden, pooled)
        w_x0 = snr[t].clamp(max=args.min_snr) + (1.0 if args.loss_weight == "min_snr_plus1" else 0.0)
        w = (w_x0 / (snr[t] + 1)).float().to(device)  # v-loss = (snr + 1) * x0-loss
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, params, alpha=1 - decay)
        loss_acc += loss.item()
        if step % 25 == 0:
            dt = (time.perf_counter() - t_log) / 25
            log.info("step %d/%d loss %.4f lr %.2e %.2fs/step", step, args.steps, loss_acc / 25, lr_at(step), dt)
            t_log, loss_acc = time.perf_counter(), 0.0
        if step % args.eval_every == 0 or step == args.steps:
            evaluate()
            t_log = time.perf_counter()
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or step == args.steps:
            save_ckpt()
            last_ckpt = time.time()
    log.info("done: %d steps; best all-five %.3f", step, max([c["all_five"] for c in curve] or [0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
