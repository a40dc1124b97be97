"""A training run's folder: the guards every trainer and fine-tuner runs before it writes there (a new run never
replaces an earlier checkpoint, a model, a dataset or another run's files; a resume loads only a matching
checkpoint; one run writes into a folder at a time)."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UsageError


def refuse_to_restart(checkpoint: Path, resume: bool, flag: str = "--out") -> None:
    """UsageError when a run would start from nothing over ``checkpoint``, an earlier run's (its first save would
    replace it): the same command without --resume must not lose hours of training."""
    if checkpoint.exists() and not resume:
        raise UsageError(f"{checkpoint.parent} holds a checkpoint of an earlier run; pass --resume to continue it, or "
                         f"choose another {flag} folder (or delete that one) to start again.")


def refuse_to_replace(folder: Path, continuing: bool, flag: str) -> None:
    """UsageError before a training run whose model folder ``folder`` would replace what is there: a file, a
    folder in the model store, or (on a new run, not --resume) a folder that already holds files, which may be a
    model someone trained for hours or one history refers to."""
    from engine import state

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file; give a folder for the model to be written to.")
    store = (state.home() / "models").resolve()
    if folder.resolve() == store or store in folder.resolve().parents:
        raise UsageError(f"{flag} {folder} is in the model store; train into another folder, then "
                         "`studio models import` it.")
    if not continuing and folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} already holds files; a new training run writes its model to a new or empty "
                         f"folder: choose another {flag}, or delete that one (--resume continues the run that "
                         "wrote it).")


@contextmanager
def resuming(checkpoint: Path):
    """Loading ``checkpoint`` into networks built from this command's flags: a network of another shape (the run
    was started with other settings) is one sentence, not torch's list of mismatched tensors."""
    try:
        yield
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        raise UsageError(f"The checkpoint in {checkpoint.parent} was made with other model settings than this "
                         "command's; resume with the flags the run started with, or start a new run in another "
                         "folder.") from None


RUN_FILES = ("adapter", "checkpoint", "finetune.json", "log.jsonl", "samples", "run.lock")  # what a run writes


def refuse_foreign_folder(out: Path) -> None:
    """UsageError when a run folder ``out`` is a file, in the model store, or holds what a fine-tune run does not
    write: a dataset, a model folder (built-in or not), the state folder. Those gained a run's files beside theirs."""
    from engine import state

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the fine-tune run.")
    store = (state.home() / "models").resolve()
    if out.resolve() == store or store in out.resolve().parents:
        raise UsageError(f"--out {out} is in the model store; give a run folder of its own.")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES
                     and not p.name.startswith(".checkpoint.")) if out.is_dir() else []
    if foreign:
        raise UsageError(f"--out {out} holds files a fine-tune run does not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder, or the run's own "
                         "folder with --resume.")


@contextmanager
def run_lock(out: Path):
    """``out/run.lock`` for as long as a run writes into ``out``: a second run into the same folder (the window's and
    the command line's, say) is refused; a lock left by a process that died is taken over."""
    from engine.jobsave import owner_alive, owner_id

    lock = out / "run.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = lock.read_text(encoding="utf-8").strip()
            except OSError:
                owner = ""
            if owner and owner_alive(owner):
                raise UsageError(f"Another fine-tune (process {owner.rpartition(':')[2]}) is writing to {out}; wait "
                                 "for it to end, or choose another --out folder.") from None
            lock.unlink(missing_ok=True)  # its process died
    else:
        raise UsageError(f"Another fine-tune took {out} at the same moment; choose another --out folder.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(owner_id())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


RESUMED_AS_STARTED = ("steps", "lr", "batch", "seed", "warmup", "weight_decay", "clip")  # what shapes the weights


def refuse_changed(out: Path, state: dict, recipe_now: dict, settings) -> None:
    """UsageError when ``--resume`` asks for other settings, another dataset, LoRA or base model than the run was
    started with: the adapter would be a mix of two runs, while its history row describes one (its replay then
    differs). A checkpoint from before these were recorded is not checked."""
    was = state.get("settings") or {}
    for name in RESUMED_AS_STARTED:
        if name in was and settings is not None and was[name] != getattr(settings, name):
            raise UsageError(f"The run in {out} was started with --{name.replace('_', '-')} {was[name]}, not "
                             f"{getattr(settings, name)}; resume it with the settings it started with, or start a "
                             "new run in another --out folder.")
    def comparable(key, recipe):  # as JSON keeps it; a dataset by its content, not where it lies now
        value = json.loads(json.dumps(recipe.get(key)))
        return {k: v for k, v in value.items() if k != "path"} if key == "data" and isinstance(value, dict) else value

    recipe = state.get("recipe") or {}
    for key, what in (("base_model", "another base model"), ("data", "another dataset"),
                      ("lora", "other LoRA settings"), ("seed", "another seed")):
        if key in recipe and comparable(key, recipe) != comparable(key, recipe_now):
            raise UsageError(f"The run in {out} was started with {what} than this command's; resume it as it "
                             "started, or start a new run in another --out folder.")


def unfinished(folder) -> bool:
    """A run folder with a checkpoint and no finished adapter (``finetune.json`` is written at the end): a run
    that stopped (paused, cancelled, the studio closed) and can be resumed."""
    if not isinstance(folder, (str, Path)) or not folder:  # (a hand-edited settings file may hold anything)
        return False
    return (Path(folder) / "checkpoint" / "state.json").is_file() and not (Path(folder) / "finetune.json").exists()
