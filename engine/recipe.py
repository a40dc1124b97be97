"""The recipe of a generation: what ran (generator, model, options, seed, backend, inputs) and a hash of what it
made, as written beside each output and into the history; ``engine.replay`` reads it back."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import engine
from engine import outputs as out_mod
from engine.errors import StudioError
from engine.generators import Result, adapter_weights
from engine.store import side_hash

if TYPE_CHECKING:
    from engine.runner import Prepared

log = logging.getLogger(__name__)


def _model_of(ref, in_place: Optional[str]) -> Optional[dict]:
    """The recipe's model: name, the studio's hash, family, and the AutoV2 hash of an imported checkpoint file
    (A1111's and civitai's "Model hash") when the import recorded one; a folder used in place (``--model PATH``)
    also by its absolute path, which a replay from any folder uses before the name; ``side_sha256``: the files
    beside the weights that the hash leaves out (preprocessor, tokenizer settings, chat template)."""
    if ref is None:
        return None
    model = {"name": ref.name, "hash": ref.hash, "family": ref.family}
    if in_place:
        model["path"] = in_place
    try:
        side = side_hash(ref.path)
    except OSError:
        side = ""
    if side:
        model["side_sha256"] = side
    if ref.studio.get("autov2"):
        model["autov2"] = ref.studio["autov2"]
    return model


# the fields a replay or the window reads, with the JSON types the studio writes them as
RECIPE_TYPES = {"generator": (str,), "prompt": (str, type(None)), "options": (dict,), "seed": (int, type(None)),
                "model": (dict, str, type(None)), "loras": (list, type(None)), "messages": (list, type(None)),
                "image": (dict, type(None)), "mask": (dict, type(None)), "backend": (str,), "device": (str,)}


def recipe_problem(recipe) -> str:
    """Why a recipe (from history, an image's metadata, a file) cannot be used, as a sentence; "" when it can."""
    if not isinstance(recipe, dict):
        return "This recipe is not the JSON object the studio writes."
    if recipe.get("damaged"):
        return str(recipe["damaged"]).capitalize() + "."
    for key, kinds in RECIPE_TYPES.items():
        value = recipe.get(key)
        if key in recipe and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            return f"This recipe's {key} is {type(value).__name__}, not what the studio writes; it cannot be used."
    parts = [("model", recipe.get("model"), "name")] if isinstance(recipe.get("model"), dict) else []
    parts += [(key, recipe.get(key), "path") for key in ("image", "mask") if recipe.get(key) is not None]
    parts += [("loras", lora, "path") for lora in recipe.get("loras") or []]
    for key, part, field in parts:  # the inner fields a replay reads
        if not isinstance(part, dict) or not isinstance(part.get(field, ""), str) or \
                not isinstance(part.get("sha256", ""), (str, type(None))):
            return f"This recipe's {key} is not what the studio writes; it cannot be used."
    return ""


def recipe_of(prep: Prepared, result: Result, timings: dict) -> dict:
    req = prep.request
    recipe = {
        "generator": prep.generator.info.id,
        "plugin": prep.plugin,
        "prompt": req.prompt,
        "model": _model_of(req.model, prep.model_path),
        "backend": req.backend,
        "device": req.device,
        "seed": req.seed,
        "options": dict(req.options),
        "timings": timings,
        "warnings": list(result.warnings),
        "info": dict(result.info),
        "studio_version": engine.__version__,
        "created": time.time(),
    }
    if req.export is not None:  # which export ran, so a replay runs the same one
        recipe["onnx_export"] = Path(req.export).name
    if prep.threads:  # torch on the CPU: a replay runs on as many threads (another count can round differently)
        recipe["threads"] = prep.threads
    if prep.job.backend == "auto":
        recipe["backend_chosen_by"] = "auto"
    if req.image is not None:
        recipe["image"] = keep_input(Path(req.image))
    if req.mask is not None:
        recipe["mask"] = keep_input(Path(req.mask))
    if req.messages:
        recipe["messages"] = [m.to_dict() for m in req.messages]
    if req.adapters:
        recipe["loras"] = [keep_adapter(a) for a in req.adapters]
    if result.text is not None:
        recipe["text"] = result.text
        recipe["token_ids"] = list(result.token_ids or [])
    if result.image is not None:
        recipe["width"], recipe["height"] = result.image.size
    recipe["content_sha256"] = content_digest(result)
    return recipe


def kept_input(digest: str, suffix: str) -> Path:
    from engine import state

    return state.home() / "inputs" / f"{digest}{suffix.lower()}"


def keep_input(path: Path) -> dict:
    """An input file as the recipe holds it: its absolute path and sha256, and a copy in the state folder
    addressed by that hash (``inputs/<sha256><suffix>``), so that a replay works from any folder and after the
    original moved. A copy that cannot be made only means the replay needs the original."""
    digest = out_mod.sha256_file(path)
    entry = {"path": str(path.resolve()), "sha256": digest}
    copy = kept_input(digest, path.suffix)
    try:
        if not copy.is_file():
            out_mod.atomic_write_bytes(copy, path.read_bytes())
        entry["kept"] = str(copy)
    except (OSError, StudioError) as exc:
        log.warning("The input %s was not kept in the state folder (%s); replays will need the original.", path, exc)
    return entry


def adapter_digest(recorded: dict) -> str:
    """A recorded LoRA's identity: its weights' sha256, and for a PEFT folder whose config was hashed,
    ``<weights sha256>+<config sha256>``; the kept copy is named by it."""
    digest, config = recorded.get("sha256") or "", recorded.get("config_sha256")
    return f"{digest}+{config}" if digest and isinstance(config, str) and config else digest


def keep_adapter(ref) -> dict:
    """A LoRA as the recipe holds it, with a copy kept by its identity as inputs are (a file as
    ``inputs/<sha256>.safetensors``, a PEFT folder's config and weights as ``inputs/<weights>+<config>.peft/``), so
    a replay works after the original moved or changed. Kept once per content; one that cannot be kept is only a
    warning."""
    entry = ref.to_dict()
    path = Path(ref.path)
    copy = kept_input(adapter_digest(entry), ".peft" if path.is_dir() else path.suffix)
    weights = adapter_weights(path)
    pairs = [(path / "adapter_config.json", copy / "adapter_config.json"), (weights, copy / weights.name)] \
        if path.is_dir() else [(path, copy)]  # (the weights last: a kept folder with its weights is whole)
    try:
        for src, dest in pairs:
            if src.is_file() and not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                with out_mod.replacing(dest) as tmp:  # whole or absent, also beside another process's copy
                    shutil.copyfile(src, tmp)
        entry["kept"] = str(copy)
    except OSError as exc:
        log.warning("The LoRA %s was not kept in the state folder (%s); replays will need the original.", path, exc)
    return entry


def content_digest(result: Result) -> str:
    """A hash of the generated content itself (text, pixels or samples), used by replay to compare outputs."""
    h = hashlib.sha256()
    if result.text is not None:
        h.update(b"text\0" + result.text.encode())
    if result.image is not None:
        h.update(b"image\0" + repr((result.image.mode, result.image.size)).encode() + result.image.tobytes())
    if result.audio is not None:
        import numpy as np

        data, rate = result.audio
        h.update(b"audio\0" + str(rate).encode() + np.ascontiguousarray(data).tobytes())
    return h.hexdigest()
