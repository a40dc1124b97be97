"""Replaying a recipe: the same job again, from the inputs it recorded, and why the output may differ."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from engine import outputs as out_mod
from engine.errors import UsageError
from engine.plugins import PluginHost
from engine.recipe import adapter_digest, kept_input, recipe_problem
from engine.runner import LEGACY_EXPORT, Job, Record, adapter_weights, execute, prepare, resolve_device
from engine.store import ModelStore


def _file_digest(path: Path) -> Optional[str]:
    return out_mod.sha256_file(path) if path.is_file() else None


def replay_input(recorded: Optional[dict], notes: list, what: str = "input", digest_of=_file_digest,
                 suffixes: tuple = (), digest: Optional[str] = None) -> Optional[str]:
    """The path a replay uses for a recorded input: the original when it still has its hash, else the kept copy;
    ``notes`` says which, and why. ``digest_of(path)``: the identity of what is at a path now (None: missing);
    ``digest``: the recorded one (default: the recorded sha256); ``suffixes``: other names the kept copy may have."""
    if not recorded:
        return None
    path, digest = Path(recorded.get("path", "")), digest or recorded.get("sha256")
    found = digest_of(path)
    if digest is None or found == digest:
        return str(path)
    candidates = [Path(recorded["kept"])] if recorded.get("kept") else []
    candidates += [kept_input(digest, s) for s in (Path(recorded.get("kept") or path).suffix, *suffixes)]  # this
    # studio's own copy (a recipe made on another machine, such as a Ray worker, names that machine's)
    kept = next((c for c in candidates if digest_of(c) == digest), None)
    if kept is not None:
        why = "is missing" if found is None else f"has changed since (hash {_short(digest)} -> {_short(found)})"
        notes.append(f"the {what} {path} {why}; the copy the studio kept of the original was used")
        return str(kept)
    if found is None:
        raise UsageError(f"The {what} {path} of this recipe is missing and the studio kept no copy of it "
                         f"(sha256 {_short(digest)}); put it back at that path to replay.")
    notes.append(f"the {what} {path} has changed since (hash {_short(digest)} -> {_short(found)}) and no copy of "
                 f"the original was kept, so the output may differ")
    return str(path)


def _short(digest: str) -> str:
    weights, plus, config = digest.partition("+")
    return weights[:12] + (f"+{config[:8]}" if plus else "")


def replay_lora(recorded: dict, notes: list) -> str:
    """A recorded LoRA as ``PATH:WEIGHT`` for the replayed job (the original, else the studio's kept copy). A PEFT
    folder recorded with its config's hash must match in both (an edited lora_alpha changes the output)."""
    with_config = "+" in adapter_digest(recorded)

    def digest_of(path: Path) -> Optional[str]:
        weights = _file_digest(adapter_weights(path))
        if weights is None or not with_config:
            return weights
        return f"{weights}+{_file_digest(path / 'adapter_config.json') or ''}"

    path = replay_input(recorded, notes, "LoRA", digest_of, (".peft",), adapter_digest(recorded))
    return f"{path}:{recorded.get('weight', 1.0)}"


def replay(host: PluginHost, store: ModelStore, recipe: dict, device: Optional[str] = None,
           backend: Optional[str] = None, **kw) -> tuple[Record, bool, list]:
    """Regenerate from a recipe, on its own device and backend unless ``device`` or ``backend`` says otherwise.
    Returns (record, identical, notes)."""
    job, input_notes = replay_job(store, recipe, device, backend)
    record = execute(prepare(host, store, job), **kw)
    same = record.recipe["content_sha256"] == recipe.get("content_sha256")
    return record, same, input_notes + replay_notes(recipe, record.recipe)


def replay_job(store: ModelStore, recipe: dict, device: Optional[str] = None,
               backend: Optional[str] = None) -> tuple[Job, list]:
    """The job that replays a recipe (its inputs, LoRAs and model as recorded, or the copies the studio kept; its
    export and thread count) and the notes on what was found instead: what `studio history replay` and the
    window's Replay run."""
    problem = recipe_problem(recipe) or ("" if recipe.get("generator") else
                                         "This recipe names no generator, so it cannot be replayed; load it into "
                                         "the form and generate instead.")
    if problem:
        raise UsageError(problem)
    model = recipe.get("model") or {}
    if isinstance(model, str):  # (a recipe read from an A1111 image names its checkpoint only)
        model = {"name": model}
    recorded, own = recipe.get("device", "auto"), recipe.get("backend", "torch")
    backend = backend or own
    export = None
    if backend == own == "onnx":  # the recipe's own export (another backend runs what it finds)
        export = recipe.get("onnx_export") or LEGACY_EXPORT
    if backend == "onnx" and device is None and recorded == "cuda":
        device = "cpu"  # ONNX runs on the CPU
    if device is None and recorded == "cuda" and backend != "onnx":
        try:
            resolve_device("cuda", backend)
        except UsageError:
            raise UsageError("This recipe was made on cuda, but PyTorch sees no CUDA GPU here; replay it with "
                             "--device cpu, knowing that the output may then differ.") from None
    input_notes: list = []
    image = replay_input(recipe.get("image"), input_notes)
    mask = replay_input(recipe.get("mask"), input_notes)
    name = _model_name(model, store, input_notes)
    job = Job(recipe["generator"], prompt=recipe.get("prompt"), image=image, mask=mask,
              model=name, backend=backend, device=device or recorded, seed=recipe.get("seed"),
              options=recipe.get("options", {}), messages=recipe.get("messages"),
              loras=[replay_lora(a, input_notes) for a in recipe.get("loras") or []],
              export=export, threads=_threads(recipe.get("threads")))
    return job, input_notes


def _threads(value) -> Optional[int]:
    """A recipe's torch thread count, when it is one (a hand-edited recipe's other values are left to the default)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024
    return value if ok else None


def _model_name(model: dict, store: ModelStore, notes: list) -> Optional[str]:
    """What the replay asks for: a folder used in place by its recorded path while it is there; else the name."""
    path, name = model.get("path"), model.get("name")
    if not isinstance(path, str):
        return name
    if Path(path).is_dir():
        return path
    if not any(e.name == name for e in store.list()):
        raise UsageError(f"The model folder {path} that this generation used is no longer there; put it back (or "
                         f"import it with `studio models import`) to replay it.")
    notes.append(f"the model folder {path} is no longer there, so the studio's model {name} is used")
    return name


def replay_notes(original: dict, replayed: dict) -> list:
    """Why a replay may not give the original output: another device or backend, or a changed model (a changed input or
    LoRA is said by ``replay_input``, which also finds the copy the studio kept)."""
    notes = []
    was, now = original.get("device", "auto"), replayed.get("device")
    if was != "auto" and now and now != was:
        notes.append(f"the recipe was made on {was} and is replayed on {now}; arithmetic differs between devices "
                     f"(float16 on a GPU), so the output may differ")
    threads = replayed.get("threads") or 0
    if threads > (os.cpu_count() or 1):
        notes.append(f"the recipe ran PyTorch on {threads} CPU threads, and so does the replay (the same sums), "
                     f"on this machine's {os.cpu_count()} cores: slower than usual")
    was_b, now_b = original.get("backend", "torch"), replayed.get("backend")
    if now_b and now_b != was_b:
        notes.append(f"the recipe was made with {was_b} and is replayed with {now_b}; their arithmetic differs, so "
                     f"the output may differ")
    was_t = ((original.get("info") or {}).get("template") or {}).get("sha256")
    now_t = ((replayed.get("info") or {}).get("template") or {}).get("sha256")
    if was_t and now_t and was_t != now_t:
        notes.append("the model's chat template has changed since, so the prompt and the output may differ")
    reused = (original.get("info") or {}).get("reused_tokens") or 0
    if reused and was == "cuda":
        notes.append(f"the original answer reused the cached keys and values of {reused} earlier tokens, which a "
                     "replay computes afresh; in float16 on a GPU the rounding of the two can differ")
    old, new = original.get("model") or {}, replayed.get("model") or {}
    old = {"name": old} if isinstance(old, str) else old
    if old.get("hash") and new.get("hash") and new["hash"] != old["hash"]:
        notes.append(f"model {old.get('name')} has changed since (hash {old['hash'][:12]} -> {new['hash'][:12]}), "
                     f"so the output may differ")
    if old.get("side_sha256") and new.get("side_sha256", "") != old["side_sha256"]:
        notes.append(f"the files beside model {old.get('name')}'s weights (its preprocessor, tokenizer settings or "
                     f"chat template) have changed since, so the output may differ")
    return notes

