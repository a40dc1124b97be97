"""A fine-tuning job, the same for every family: steps, checkpoints, resume, stop on NaN, the loss log.

A family gives a ``Task`` (its LoRA-wrapped model, its batches and losses, how to save the adapter); ``run``
drives it. Everything a step draws is derived from (seed, step): batches from ``numpy.random.default_rng([seed,
step])`` and dropout from ``torch.manual_seed``, so a run resumed from a checkpoint reaches the same loss at step N
as one that never stopped.

Files in the run folder ``out``:
  ``checkpoint/``   the last complete checkpoint (adapter tensors, optimizer state, step), replaced atomically
  ``log.jsonl``     one line per logged step: step, loss, val_loss (when evaluated), seconds per step
  ``samples/``      the image samples of each evaluation (``step-000050.png``), for families that draw them
  ``adapter/``      the finished adapter (the family's format), written at the end
  ``finetune.json`` the recipe: base model and hash, dataset fingerprint, hyper-parameters, seed, result
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from engine.errors import CancelledError, OptionError, StudioError, UsageError
from engine.outputs import replacing
from engine.pace import Pace, progress_printer
from engine.runfolder import refuse_changed, refuse_foreign_folder, refuse_to_restart, run_lock

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """The training loop's hyper-parameters; their defaults and ranges are the fine-tuner's options
    (``lora_options``), read from its command line by ``settings_from``."""
    steps: int
    lr: float
    batch: int
    seed: int
    checkpoint_every: int
    eval_every: int
    warmup: int
    weight_decay: float
    clip: float


def settings_from(args) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})


class Task:
    """What a family provides. ``model`` is wrapped (engine.nn.lora.wrap) so only the adapter trains; it and the
    tensors ``batch`` returns live on ``device`` (``--device``, resolved by ``base_model``); random draws are made on
    the CPU, so a seed gives the same batches on any device."""
    model = None
    device = "cpu"
    recipe: dict = {}
    summary = ""  # what it trains on, said before training starts ("32 images; new words: star")

    def batch(self, rng):  # a training batch drawn with ``rng``
        raise NotImplementedError

    def loss(self, batch):  # a scalar tensor
        raise NotImplementedError

    def val_loss(self) -> float:  # on the fixed validation split
        raise NotImplementedError

    def sample(self):  # a fixed-seed sample to watch progress: text, a PIL image (saved under samples/), or None
        return None

    def save(self, folder: Path) -> None:  # the adapter in its standard format
        raise NotImplementedError

    # For families whose samples are indexed (images): the split, the batches' indices, the samples to show.
    val_idx = train_idx = prior_idx = ()

    def split(self, n: int, fraction: float, seed: int) -> None:
        """``val_idx``: ``fraction`` of ``n`` samples shuffled with ``seed`` (at least one when there are two or
        more and ``fraction`` > 0); ``train_idx``: the rest (all of them when nothing would be left)."""
        import numpy as np

        order = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(round(n * fraction))) if n > 1 and fraction > 0 else 0
        self.val_idx, self.train_idx = order[:n_val], order[n_val:] if n_val < n else order

    def draw(self, rng, batch: int, prior_share: float):
        """A batch's sample indices from the training split; with prior images (``prior_idx``), a ``prior_share``
        of them from those (prior preservation)."""
        idx = rng.choice(self.train_idx, size=batch)
        if len(self.prior_idx):
            take = rng.random(batch) < prior_share
            idx[take] = rng.choice(self.prior_idx, size=int(take.sum()))
        return idx

    def shown(self, n: int) -> list:
        """The first ``n`` samples to show at each evaluation: held-out ones first."""
        held = set(self.val_idx)
        return (list(self.val_idx) + [i for i in self.train_idx if i not in held])[:n]


def _lr(step: int, s: Settings) -> float:
    if step < s.warmup:  # (never with warmup 0)
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return 0.1 * s.lr + 0.9 * s.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _save_checkpoint(out: Path, task: Task, opt, step: int, history: list, settings: "Settings" = None) -> None:
    import torch
    from safetensors.torch import save_file

    from engine.nn.lora import trainable

    tmp = out / f".checkpoint.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable(task.model)}, str(tmp / "adapter.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history, "recipe": task.recipe,
                                                "settings": asdict(settings) if settings else None}))
    final, old = out / "checkpoint", out / f".checkpoint.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out: Path, task: Task, opt, settings: "Settings" = None) -> tuple:
    import torch
    from safetensors.torch import load_file

    folder = out / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    refuse_changed(out, state, task.recipe, settings)
    tensors = load_file(str(folder / "adapter.safetensors"))
    params = dict(task.model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise UsageError(f"The checkpoint in {out} belongs to another model or LoRA settings ({missing[0]}); "
                         "start afresh with another --out folder.")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return state["step"], state["history"]


def _save_sample(out: Path, step: int, image) -> Path:
    path = out / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def run(task: Task, settings: Settings, out: Path, resume: bool = False, cancel=None,
        report: Callable[[dict], None] = lambda e: None) -> dict:
    """Train ``task`` for ``settings.steps`` steps; returns the finished recipe (also ``out/finetune.json``).

    ``report`` sees {"step", "total", "loss", "val_loss"?, "seconds_per_step", "eta_s", "sample"? (text),
    "sample_image"? (a PNG's path)} as it goes.
    A loss that is not finite stops the run and keeps the last good checkpoint (StudioError); so does a full
    disk while checkpointing. ``cancel`` (an engine CancelToken) stops it after the current step, checkpointed.
    ``out`` must be new, empty or the run's own folder (``refuse_foreign_folder``); one run at a time writes there."""
    out = Path(out)
    refuse_foreign_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return _run(task, settings, out, resume, cancel, report)


def _run(task: Task, settings: Settings, out: Path, resume: bool, cancel, report) -> dict:
    import numpy as np
    import torch

    from engine.nn.lora import trainable

    params = [p for _, p in trainable(task.model)]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    start, history = 0, []
    if resume and (out / "checkpoint" / "state.json").is_file():
        start, history = _load_checkpoint(out, task, opt, settings)
        report({"message": f"resumed from the checkpoint at step {start}"})
    else:
        refuse_to_restart(out / "checkpoint", resume)
    logf = open(out / "log.jsonl", "a", encoding="utf-8")
    pace, last_ck = Pace(settings.steps, settings.eval_every, settings.checkpoint_every), start
    try:
        for step in range(start, settings.steps):
            t0 = time.perf_counter()
            if cancel is not None and cancel.cancelled:
                _save_checkpoint(out, task, opt, step, history, settings)
                raise CancelledError(f"Fine-tuning stopped at step {step}; resume it with --resume.")
            task.model.train()
            torch.manual_seed(settings.seed * 1_000_003 + step)
            batch = task.batch(np.random.default_rng([settings.seed, step]))
            for g in opt.param_groups:
                g["lr"] = _lr(step, settings)
            loss = task.loss(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                kept = (f"the last good checkpoint, step {last_ck}, is kept in {out}; start again with a lower --lr "
                        "in another --out folder" if (out / "checkpoint").exists() else "no checkpoint was written "
                        "yet; start again with a lower --lr")
                raise StudioError(f"The loss became {value} at step {step + 1} (the learning rate {settings.lr:g} "
                                  f"is probably too high); {kept}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            opt.step()
            done = step + 1
            pace.step(time.perf_counter() - t0)
            event = {"step": done, "total": settings.steps, "loss": round(value, 6)}
            if done % settings.eval_every == 0 or done == settings.steps:
                t0 = time.perf_counter()
                task.model.eval()
                with torch.no_grad():
                    event["val_loss"] = round(float(task.val_loss()), 6)
                    sample = task.sample()
                if isinstance(sample, str):
                    event["sample"] = sample
                elif sample is not None:  # an image: saved beside the log, its path reported
                    event["sample_image"] = str(_save_sample(out, done, sample))
                pace.evaluated(time.perf_counter() - t0)
            event.update(seconds_per_step=round(pace.seconds_per_step(), 4), eta_s=round(pace.eta(done), 1))
            history.append({k: event[k] for k in ("step", "loss", "val_loss") if k in event})
            logf.write(json.dumps(event) + "\n")
            logf.flush()
            report(event)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                t0 = time.perf_counter()
                try:
                    _save_checkpoint(out, task, opt, done, history, settings)
                except OSError as exc:
                    raise StudioError(f"Could not write the checkpoint at step {done} ({exc.strerror}); the last "
                                      f"complete checkpoint, step {last_ck}, is kept in {out}.") from None
                last_ck = done
                pace.checkpointed(time.perf_counter() - t0)
    finally:
        logf.close()
    task.model.eval()
    task.save(out / "adapter")
    recipe = dict(task.recipe, settings=asdict(settings), final_loss=history[-1]["loss"] if history else None,
                  final_val_loss=next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
                  adapter=str(out / "adapter"), steps_done=settings.steps)
    (out / "finetune.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def lora_options(steps: int, lr: float, batch: int, rank: int, alpha: float, dropout: float, every: int) -> tuple:
    """The options every LoRA fine-tuner shares, with a family's defaults (engine.generators.Option: the GUI's
    fine-tune page renders them; ``add_options`` makes them the command's flags)."""
    from engine.generators import DEVICES, Option

    return (
        Option("rank", "int", rank, "LoRA rank r: the adapter's size (a larger rank learns more and overfits sooner)",
               min=1, max=1024),
        Option("alpha", "float", alpha, "LoRA alpha: the adapter's output is scaled by alpha / rank", min=0.0),
        Option("dropout", "float", dropout, "dropout on the adapter's input (against overfitting a small dataset)",
               min=0.0, max=0.9),
        Option("steps", "int", steps, "optimizer steps to train", min=1),
        Option("lr", "float", lr, "peak learning rate (a short warm-up, then a cosine decay to a tenth)", min=1e-8),
        Option("batch", "int", batch, "training samples per step", min=1, max=4096),
        Option("eval_every", "int", every, "measure the validation loss (and draw a sample) every N steps", min=1),
        Option("checkpoint_every", "int", every, "save a resumable checkpoint every N steps", min=1),
        Option("seed", "int", 0, "seed of the adapter's first weights, the batches and the dropout", min=0),
        Option("warmup", "int", 10, "steps over which the learning rate rises to its peak", min=0),
        Option("weight_decay", "float", 0.0, "AdamW weight decay on the adapter's weights", min=0.0, max=1.0),
        Option("clip", "float", 1.0, "clip the gradient norm to this (0 = no clipping)", min=0.0),
        Option("threads", "int", 0, "torch CPU threads (0: torch's default)", min=0, max=1024),
        Option("device", "str", "auto", "where to train: auto (a CUDA GPU when there is one), cpu or cuda",
               choices=DEVICES),
    )


def add_flags(parser, **defaults) -> None:
    """Plain flags from a table of defaults: ``steps=6000`` becomes ``--steps`` (an int, default 6000); a bool
    becomes ``--name`` / ``--no-name``."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def add_options(parser, options) -> None:
    """Each Option as the flag ``--name-with-dashes`` of an argparse parser, with its default and help; a value
    is parsed and checked by the Option (its type, range and choices), as the window's form does."""
    for o in options:
        flag = "--" + o.name.replace("_", "-")
        if o.type == "bool":  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=o.default, help=o.help)
        else:
            parser.add_argument(flag, type=_checked(o), default=o.default, choices=o.choices, help=o.help)


def _checked(option):
    def parse(text: str):
        try:
            return option.parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"Option {option.name} ", "", 1)) from None
    parse.__name__ = option.type  # argparse names the type in its own messages
    return parse


_STOP: list = []  # the CancelToken SIGTERM sets, from the moment the command's arguments are read


def stop_token(fresh: bool = False):
    """The token that SIGTERM (the window's Pause) cancels: a fresh one from when ``parse_command`` reads a command's
    arguments, so a Pause while the data and the model are still being prepared is not lost (it was: the run then
    trained to its end)."""
    import signal
    import threading

    from engine.generators import CancelToken

    if fresh or not _STOP:
        _STOP[:] = [CancelToken()]
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            token = _STOP[0]
            signal.signal(signal.SIGTERM, lambda *_: token.cancel())
    return _STOP[0]


def parse_command(kind: str, description: str, data_help: str, options, argv) -> "argparse.Namespace":
    """The arguments of ``studio finetune KIND``: --model, --data, --out, the fine-tuner's options, --resume and
    --json, each option checked by its own range (``add_options``)."""
    import sys

    p = argparse.ArgumentParser(prog=f"studio finetune {kind}", description=description)
    p.add_argument("--model", required=True, help="base model (a name from `studio models list`)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", help="run folder (default: $STUDIO_HOME/finetunes/<model>-<data name>)")
    add_options(p, options)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object per logged step")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    stop_token(fresh=True)
    return a


def base_model(a, fits: Callable, wanted: str):
    """The store's entry for ``--model`` when ``fits(entry)``, else a UsageError saying it fine-tunes ``wanted``;
    sets torch's threads from ``--threads``."""
    import torch

    from engine.plugins import PluginHost
    from engine.store import ModelStore

    if a.threads:
        torch.set_num_threads(a.threads)
    entry = ModelStore(PluginHost().load()).get(a.model)
    if not fits(entry):
        raise UsageError(f"{entry.name} is a {entry.family} model; this fine-tuner needs {wanted}.")
    return entry


def device_of(a) -> str:
    """The device a task trains on: ``--device`` with ``auto`` turned into cuda or cpu (and written back into ``a``,
    so the history records where it ran); cpu for options without one."""
    from engine.runner import resolve_device

    a.device = resolve_device(getattr(a, "device", "cpu"), "torch")
    return a.device


def captioned_data(a) -> tuple:
    """``--data`` and ``--prior-data`` (when given) of an image fine-tuner: ([(image, caption)], [prior pairs])."""
    from engine.datasets import captioned_images

    prior = []
    if getattr(a, "prior_data", ""):
        prior = captioned_images(Path(a.prior_data))
        if not 0 < a.prior_share < 1:
            raise UsageError("--prior-share must be between 0 and 1.")
    pairs = captioned_images(Path(a.data))
    empty = [p.name for p, caption in pairs if not caption.strip()]
    if empty:
        import sys

        print(f"note: {len(empty)} image(s) have an empty caption ({', '.join(empty[:3])}"
              f"{', ...' if len(empty) > 3 else ''}); they train the model with no prompt.", file=sys.stderr)
    return pairs, prior


def run_folder(a, entry) -> Path:
    from engine import state

    return Path(a.out).expanduser() if a.out else state.home() / "finetunes" / f"{entry.name}-{Path(a.data).stem}"


def start(task: Task, a, out: Path, adapter_file: str = "") -> int:
    """Say what is about to train (on stderr, with ``task.summary``), then ``run_command``."""
    import sys

    count = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    print(f"fine-tuning {a.model} on {getattr(a, 'device', 'cpu')}: LoRA rank {a.rank} on {len(task.paths)} layers, "
          f"{count:,} trainable parameters; {task.summary}; run folder {out}", file=sys.stderr)
    return run_command(task, a, out, adapter_file)


ARGS_SKIPPED = ("resume", "json", "out")  # flags a history row does not replay with


def record_history(recipe: dict, a, adapter: Path):
    """One history row for a finished fine-tune (``adapter``: its file or PEFT folder): generator ``finetune``, its
    recipe, the arguments that run it again, and the adapter's weights file with its hash. Returns the row's id,
    or None when the history cannot be written (the adapter is on disk either way, and a warning says so)."""
    import sys
    import time

    from engine.history import History
    from engine.outputs import sha256_file
    from engine.runner import adapter_weights

    weights = adapter_weights(adapter)
    args = {k: v for k, v in vars(a).items() if k not in ARGS_SKIPPED}
    for key in ("data", "prior_data"):  # a replay from another folder finds them (a relative path did not)
        if args.get(key):
            args[key] = str(Path(args[key]).expanduser().resolve())
    row = {"generator": "finetune", "kind": recipe.get("kind"), "model": recipe.get("base_model") or {},
           "prompt": f"fine-tune on {(recipe.get('data') or {}).get('path', a.data)}", "seed": a.seed,
           "created": time.time(), "finetune": recipe, "args": args}
    try:
        return History().add(row, [{"path": str(weights), "sha256": sha256_file(weights)}])
    except (StudioError, OSError) as exc:
        print(f"warning: the fine-tune is not in the history ({exc})", file=sys.stderr)
        return None


def rerun_args(row: dict, out: Path) -> list:
    """The command-line arguments of a history row's fine-tune, writing to ``out`` (a fresh folder)."""
    argv, args = [], dict(row.get("args") or {})
    recorded = ((row.get("finetune") or {}).get("data") or {}).get("path")
    if recorded and args.get("data") and not Path(args["data"]).is_absolute():  # rows written before paths were
        args["data"] = recorded  # made absolute: the recipe has the absolute one
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv + ["--out", str(out)]


def replay(row: dict, outputs: list, out: Path) -> tuple:
    """Train a history row's fine-tune again, into the fresh folder ``out``: (the new adapter's weights file,
    whether its hash is the recorded one: the studio's fine-tunes are deterministic for a seed on one device)."""
    from engine.outputs import sha256_file
    from engine.plugins import PluginHost

    if (out / "checkpoint").exists():
        raise UsageError(f"{out} holds another run; give --out a new folder.")
    code = PluginHost().load().trainer(row["kind"], finetune=True).run(rerun_args(row, out))
    weights = out / "adapter" / Path(outputs[0]["path"]).name
    if code or not weights.is_file():
        raise StudioError(f"The fine-tune did not finish again (exit code {code}); see the messages above.")
    return weights, sha256_file(weights) == outputs[0]["sha256"]


def run_command(task: Task, a, out: Path, adapter_file: str = "") -> int:
    """What ``studio finetune KIND`` does once a family has built its task from parsed options ``a`` (steps, lr,
    batch, seed, checkpoint_every, eval_every, resume, json): train with progress on stderr (``progress_printer``; one
    JSON line per logged step with ``--json``), then print where the adapter is (``adapter_file`` inside the adapter
    folder). SIGTERM stops it after the current step with a checkpoint there (what the GUI's Pause sends)."""
    import sys

    report = progress_printer(a.json)
    token = stop_token()
    try:
        recipe = run(task, settings_from(a), out, resume=a.resume, cancel=token, report=report)
    except KeyboardInterrupt:
        if (out / "checkpoint").exists():
            raise StudioError(f"Stopped; the last checkpoint in {out} resumes with --resume.") from None
        raise StudioError("Stopped before the first checkpoint; there is nothing to resume, start again.") from None
    adapter = str(Path(recipe["adapter"]) / adapter_file) if adapter_file else recipe["adapter"]
    row = record_history(recipe, a, Path(adapter))
    if row is not None and not a.json:
        print(f"history row {row} (`studio history replay {row}` trains it again and compares the adapter)",
              file=sys.stderr)
    print(json.dumps({"adapter": adapter, "final_loss": recipe["final_loss"],
                      "final_val_loss": recipe["final_val_loss"]}) if a.json else adapter)
    return 0
