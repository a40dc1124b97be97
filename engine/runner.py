"""Running a generation: validate the job, resolve model/seed/device, drive the generator, write outputs and history.

What a run records is engine.recipe; running a recipe again is engine.replay.

The CLI and the GUI both call ``prepare`` then ``execute``; nothing here knows about either.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

from engine import commit
from engine import outputs as out_mod
from engine.errors import GenerationError, OptionError, StudioError, UsageError
from engine.generators import (ADAPTER_WEIGHT_FILES, BACKENDS, DEVICES, AdapterRef, Context, Generator, Partial,
                               Progress, Request, Result, adapter_weights)
from engine.history import History
from engine.plugins import PluginHost
from engine.plugin_code import plugin_code, quietly
from engine.recipe import recipe_of
from engine.results import check_result, writable_text
from engine.store import ModelStore

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 10_000
LEGACY_EXPORT = ""  # a recipe from before the export was recorded: the fp32-first rule of that time


@dataclass
class Job:
    generator: str
    prompt: Optional[str] = None
    image: Optional[str] = None
    mask: Optional[str] = None  # an inpainting mask for the image (white = repaint)
    model: Optional[str] = None
    backend: str = "auto"  # "auto": ONNX on the CPU when the model has a gated export, else torch (choose_backend)
    device: str = "auto"
    seed: Optional[int] = None
    options: dict = field(default_factory=dict)  # raw values (strings from the CLI, typed from the GUI)
    loras: list = field(default_factory=list)  # "PATH[:WEIGHT]": LoRA files or PEFT folders to apply
    messages: Optional[list] = None  # a conversation, [{"role", "content"}, ...], for generators that take one
    export: Optional[str] = None  # with the onnx backend: the export folder to run (a replay's recorded one)
    threads: Optional[int] = None  # torch's CPU threads (a replay's recorded count: sums split over threads round
    # differently, so another count can give another image)


# what a job file (`studio batch`) or the API (/jobs) may set: every field but what a replay takes from its recipe
REPLAY_ONLY = ("export", "threads")
JOB_KEYS = tuple(f.name for f in fields(Job) if f.name not in REPLAY_ONLY)
_TEXT_KEYS = ("generator", "prompt", "image", "mask", "model", "backend", "device")


def queued_job(payload: dict) -> Job:
    """A queue row's job (``JobQueue.claim`` checked it): its Job fields."""
    names = {f.name for f in fields(Job)}
    return Job(**{k: v for k, v in payload.items() if k in names})


def job_from_dict(obj) -> Job:
    """A job as JSON gives it (a job file's line, a POST /api/jobs body); UsageError names the first wrong field."""
    if not isinstance(obj, dict):
        raise UsageError("A job is a JSON object, such as {\"generator\": \"text\", \"prompt\": \"ROMEO:\"}.")
    obj = {k: v for k, v in obj.items() if v is not None}  # a null field is one left out (its default)
    unknown = sorted(set(obj) - set(JOB_KEYS))
    if unknown:
        raise UsageError(f"Unknown job field(s) {', '.join(unknown)}; a job has {', '.join(JOB_KEYS)}.")
    if "generator" not in obj:
        raise UsageError("A job needs a generator, such as \"generator\": \"text\".")
    for key in _TEXT_KEYS:
        if key in obj and not isinstance(obj[key], str):
            raise UsageError(f"The job's {key} must be a string, not {obj[key]!r}.")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UsageError(f"The job's seed must be a whole number, not {seed!r}.")
    if not isinstance(obj.get("options", {}), dict):
        raise UsageError("The job's options must be an object, such as {\"steps\": 20}.")
    loras = obj.get("loras", [])
    if not isinstance(loras, list) or not all(isinstance(x, str) for x in loras):
        raise UsageError("The job's loras must be a list of \"PATH[:WEIGHT]\" strings.")
    if "messages" in obj and not isinstance(obj["messages"], list):
        raise UsageError("The job's messages must be a list of {\"role\", \"content\"} objects.")
    return Job(**obj)


@dataclass
class Prepared:
    job: Job
    generator: Generator
    request: Request
    plugin: str
    threads: int = 0  # torch's CPU threads, when torch runs on the CPU
    model_path: Optional[str] = None  # a model folder used in place (not from the store)


@dataclass
class Record:
    """A finished generation: its recipe (JSON-ready), the files written, the history id and the raw result."""

    recipe: dict
    files: list
    history_id: Optional[int]
    result: Result


def nth_seed(seed: Optional[int], i: int) -> Optional[int]:
    """The seed of the i-th job of a batch that starts at ``seed`` (None: each draws its own): seed + i, counted
    around past 2^63-1 back to 0 so that a batch from the largest seed runs like any other."""
    if seed is None or isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        return seed  # no seed, or one that prepare refuses as it is (a negative one must not wrap into range)
    return (seed + i) % 2**63


def resolve_device(device: str, backend: str) -> str:
    if backend == "onnx":
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device == "auto" and backend == "auto" and not _has_cuda_driver():
        return "cpu"  # no NVIDIA driver: no need to import torch just to learn there is no GPU
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto.")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_cuda_driver() -> bool:
    import os

    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl") or os.name == "nt"


def choose_backend(backend: str, device: str, entry, job: "Job", info) -> tuple:
    """``(backend, device, export folder or None)`` for a job. ``auto``: torch on a CUDA GPU; on the CPU, ONNX when
    the model has an export that passed its gate (the fastest such variant, ``runtime.choose_export``) and the
    job uses nothing only torch runs (LoRA adapters); torch otherwise. ``torch``/``onnx`` force one."""
    from engine.backends.runtime import choose_export

    if entry is None:
        return ("torch" if backend == "auto" else backend), "cpu", None
    if backend == "auto":
        device = resolve_device(device, "auto")
        if device == "cpu" and entry.onnx and not job.loras:
            export = choose_export(entry.path, gated_only=True, model_hash=entry.hash)
            if export is not None:
                return "onnx", "cpu", export
        return "torch", (device if device == "cuda" else resolve_device(job.device, "torch")), None
    device = resolve_device(device, backend)
    if backend == "onnx":
        if job.export == LEGACY_EXPORT:
            return "onnx", "cpu", choose_export(entry.path, gated_only=False, legacy=True)
        if job.export:
            found = [f for f in _export_paths(entry) if f.name == job.export]
            if not found:
                raise UsageError(f"Model {entry.name} has no ONNX export {job.export!r} any more (the recipe ran "
                                 f"on it); run `studio export-onnx {entry.name}` again or replay with --backend torch.")
            return "onnx", "cpu", found[0]
        return "onnx", "cpu", choose_export(entry.path, gated_only=False)
    return backend, device, None


def _export_paths(entry) -> list:
    from engine.backends.runtime import export_folders

    return export_folders(entry.path)


SMALL_MODEL_BYTES = 64 << 20  # weights on disk; below this, torch runs on one CPU thread
_torch_default_threads: list = []


def set_cpu_threads(model_bytes: int, recorded: Optional[int] = None) -> int:
    """The torch CPU thread count for the next generation: a replay's ``recorded`` count; else
    ``STUDIO_TORCH_THREADS`` when set; 1 for a small model; else torch's own default (every core). Measured with
    the built-in text model (benchmarks/torch_threads.py): two threads are ~20 % faster on an idle machine but 3x
    slower when another program keeps one core busy (the GUI thread drawing tokens is such a program), so one
    thread is the safer default for small models."""

    import torch

    if not _torch_default_threads:
        _torch_default_threads.append(torch.get_num_threads())
    from engine.state import env_threads

    env = env_threads("STUDIO_TORCH_THREADS")
    n = env if env > 0 else 1 if model_bytes < SMALL_MODEL_BYTES else _torch_default_threads[0]
    if recorded is not None:
        n = recorded
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def check_text(text, what: str) -> None:
    """UsageError when ``text`` (a string) cannot be written as UTF-8 (``writable_text``)."""
    if isinstance(text, str) and not writable_text(text):
        raise UsageError(f"{what} holds bytes that are not UTF-8 text; give it in UTF-8 (set the terminal or file "
                         "to UTF-8).")


def prepare(host: PluginHost, store: ModelStore, job: Job) -> Prepared:
    """Check everything about a job before any work starts. Raises UsageError/ModelError with a clear message."""
    generator = host.generator(job.generator)
    info = generator.info
    options = info.resolve_options(job.options)
    if job.backend not in BACKENDS:
        raise UsageError(f"Backend must be one of {', '.join(BACKENDS)}, not {job.backend!r}.")
    if job.device not in DEVICES:
        raise UsageError(f"Device must be one of {', '.join(DEVICES)}, not {job.device!r}.")
    prompt = job.prompt
    if "text" in info.takes:
        if prompt is None and info.prompt_required and "image" not in info.takes:
            raise UsageError(f"Generator {info.id} needs a prompt; pass --prompt TEXT.")
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise UsageError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        check_text(prompt, "The prompt")
    elif prompt:
        hint = " (give the conversation with --messages FILE.json, or talk with `studio chat`)" \
            if "messages" in info.takes else ""
        raise UsageError(f"Generator {info.id} takes no prompt; it works on {', '.join(info.takes)}{hint}.")
    for name, value in options.items():
        check_text(value, f"Option {name}")
    messages = ()
    if "messages" in info.takes:
        from engine.chat import parse_messages

        if job.messages is None:
            raise UsageError(f"Generator {info.id} needs a conversation; pass --messages FILE.json.")
        messages = parse_messages(job.messages)
        for i, m in enumerate(messages):
            check_text(m.content, f"Message {i}")
    elif job.messages:
        raise UsageError(f"Generator {info.id} takes no conversation; give it a prompt instead.")
    image = _input_file(job.image, "image", "Image", info)
    if image is None and "image" in info.takes and info.image_required:
        raise UsageError(f"Generator {info.id} needs an image; pass --image PATH.")
    mask = _input_file(job.mask, "mask", "Mask", info)
    if mask is not None and image is None:
        raise UsageError("A mask applies to an input image; pass --image PATH with --mask.")
    model = None
    if info.families:
        entry = store.get(job.model) if job.model else store.default_for(info.id, info.families)
        if entry is None:
            raise UsageError(f"No model for generator {info.id} is installed; import one with `studio models import`.")
        if entry.family not in info.families:
            raise UsageError(f"Model {entry.name} is a {entry.family} model; generator {info.id} runs "
                             f"{', '.join(info.families)} models.")
        if job.backend == "onnx" and not entry.onnx:
            raise UsageError(f"Model {entry.name} has no ONNX export; run `studio export-onnx {entry.name}` first.")
        model = entry.ref()
        defaults = model_option_defaults(info, entry)
        if defaults:  # the model's generation_config.json gives the defaults; what the job sets wins
            options = info.resolve_options({**defaults, **job.options})
    elif job.model:
        raise UsageError(f"Generator {info.id} uses no model.")
    seed = job.seed if job.seed is not None else random.randrange(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UsageError(f"The seed must be a whole number from 0 to 2^63-1, not {seed}.")
    backend, device, export = choose_backend(job.backend, job.device, entry if model is not None else None, job,
                                             info)
    threads = 0
    if model is not None and backend == "torch" and device == "cpu":
        threads = set_cpu_threads(entry.size_bytes, job.threads)
    adapters = tuple(adapter_ref(spec) for spec in job.loras)
    if adapters and not info.takes_lora:
        raise UsageError(f"Generator {info.id} does not apply LoRA adapters; leave out --lora.")
    request = Request(prompt=prompt, image=image, mask=mask, options=options, seed=seed, model=model,
                      backend=backend, device=device, adapters=adapters, messages=messages, export=export)
    in_place = model is not None and entry.path.parent.resolve() not in (store.builtin_dir.resolve(),
                                                                         store.user_dir.resolve())
    return Prepared(job, generator, request, host.plugin_of(info.id), threads,
                    str(entry.path) if in_place else None)


def _input_file(path, kind: str, title: str, info) -> Optional[Path]:
    """The job's ``kind`` input ("image" or "mask") as an existing file, or None when not given."""
    if not path:
        return None
    if kind not in info.takes:
        raise UsageError(f"Generator {info.id} takes no {kind}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{title} {path} does not exist or is not a file.")
    return path


def model_option_defaults(info, entry) -> dict:
    """The option defaults a model brings for a generator (its ``generation_config.json``: temperature, top_k,
    ...), parsed; a value outside the option's range is left out (the generator's own default stays). What the
    GUI's option form and `studio generate GENERATOR --help` show as the defaults for that model."""
    if entry is None:
        return {}
    names = {o.name for o in info.options}
    return {k: info.option(k).parse(v) for k, v in entry.option_defaults().items() if k in names and _fits(info, k, v)}


def _fits(info, name: str, value) -> bool:
    try:
        info.option(name).parse(value)
        return True
    except OptionError:
        return False


def split_lora(spec: str) -> tuple:
    """``PATH[:WEIGHT]`` -> (path, weight as written, or None when not given); a ':' that is part of the path
    stays in it."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head:
        try:
            float(tail)
            return head, tail
        except ValueError:
            pass
    return str(spec), None


def adapter_ref(spec: str) -> AdapterRef:
    """``PATH[:WEIGHT]`` -> an AdapterRef with the file's content hash (a PEFT folder: its weights file, and its
    adapter_config.json's apart, so that recipes made before the config was hashed still compare)."""
    path, written = split_lora(spec)
    weight = 1.0 if written is None else float(written)
    if not -10.0 <= weight <= 10.0:
        raise UsageError(f"A LoRA weight must lie between -10 and 10, not {weight:g} ({spec}).")
    file = Path(path).expanduser()
    weights = adapter_weights(file)
    if not weights.is_file():
        if file.is_dir():
            raise UsageError(f"LoRA folder {path} has no {' or '.join(ADAPTER_WEIGHT_FILES)}; give a PEFT adapter "
                             "folder, a diffusers LoRA folder or a .safetensors file.")
        raise UsageError(f"LoRA {path} does not exist; give a .safetensors file or a PEFT adapter folder.")
    config = file / "adapter_config.json"
    return AdapterRef(file.stem if file.is_file() else file.name, file.resolve(), out_mod.sha256_file(weights), weight,
                      out_mod.sha256_file(config) if file.is_dir() and config.is_file() else "")


def default_path(out_dir: Path, recipe: dict, result: Result) -> Path:
    """``<time>-<generator>-<seed>.<ext>`` in ``out_dir``; engine.commit adds a number when the name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(recipe["created"]))
    makes = "image" if result.image is not None else ("audio" if result.audio is not None else "text")
    return out_dir / f"{stamp}-{recipe['generator']}-{recipe['seed']}.{out_mod.SUFFIXES[makes]}"


def renderer(result: Result, recipe: dict) -> Callable:
    """path -> [(path, bytes)]: the files of this result under that name (the recipe inside says the path)."""
    if result.image is not None:
        def render(path: Path) -> list:
            if path.suffix.lower() != ".png":
                raise UsageError(f"Images are saved as .png; {path.name} has another suffix.")
            return out_mod.png_files(path, result.image, {**recipe, "path": str(path.resolve())})
    elif result.audio is not None:
        def render(path: Path) -> list:
            data, rate = result.audio
            return out_mod.audio_files(path, data, rate, {**recipe, "path": str(path.resolve())})
    else:
        def render(path: Path) -> list:
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".wav", ".flac"):
                raise UsageError(f"Text is saved as a text file; {path.name} has an image or audio suffix.")
            return out_mod.text_files(path, result.text or "", {**recipe, "path": str(path.resolve())})
    return render


def execute(prep: Prepared, context: Optional[Context] = None, on_event: Optional[Callable] = None,
            out_path: Optional[Path] = None, out_dir: Optional[Path] = None,
            history: "History | bool | None" = None, overwrite: bool = False) -> Record:
    """Run a prepared job to its Result, then write its output and history row.

    Files and row are saved together by engine.commit (a crash leaves both or neither); an existing file is
    replaced only with ``overwrite``, else the output takes the next free numbered name and a warning says so.
    ``on_event`` sees every Progress and Partial. ``history``: a History to record in (default: the state
    folder's), or False to record nothing. A generator that raises anything but a StudioError is
    reported as a GenerationError naming its plugin; the host never crashes on plugin code.
    """
    context = context or Context()
    started = time.perf_counter()
    result = None
    with plugin_code(prep, "failed"):
        for event in quietly(prep.generator.generate(prep.request, context)):
            if isinstance(event, Result):
                result = event
            elif isinstance(event, (Progress, Partial)):
                if on_event is not None:
                    on_event(event)
            else:
                raise GenerationError(f"Generator {prep.generator.info.id} yielded {type(event).__name__}, "
                                      "which is not an event.")
            context.cancel.raise_if_cancelled()
    if result is None:
        raise GenerationError(f"Generator {prep.generator.info.id} finished without a result.")
    context.cancel.raise_if_cancelled()
    return _save(prep, result, round(time.perf_counter() - started, 4), out_path, out_dir, history, overwrite)


def execute_batch(preps: list, context: Optional[Context] = None, out_dir: Optional[Path] = None,
                  history: "History | bool | None" = None) -> list:
    """Run prepared jobs of one generator that differ only in their input and seed (same model, backend, options)
    through the generator's ``batch`` function in one pass, then save each output and history row as ``execute``
    does. One Record, or the StudioError of that job, per job, in order."""
    context = context or Context()
    gen = preps[0].generator
    if gen.batch is None:
        raise UsageError(f"Generator {gen.info.id} runs one input at a time; leave out --batch-size.")
    if len({_batch_key(p) for p in preps}) > 1:
        raise UsageError("A batch runs one model with one backend and the same options; these jobs differ.")
    started = time.perf_counter()
    with plugin_code(preps[0], "failed on a batch"):
        results = list(gen.batch([p.request for p in preps], context))
    if len(results) != len(preps):
        raise GenerationError(f"Generator {gen.info.id} returned {len(results)} results for {len(preps)} inputs.")
    context.cancel.raise_if_cancelled()
    each = round((time.perf_counter() - started) / len(preps), 4)
    out = []
    for prep, result in zip(preps, results):
        if isinstance(result, StudioError):
            out.append(result)
        elif not isinstance(result, Result):
            out.append(GenerationError(f"Generator {gen.info.id} returned {type(result).__name__} for an input "
                                       "of a batch, not a result."))
        else:
            out.append(_save(prep, result, each, None, out_dir, history, False))
    return out


def _batch_key(prep: Prepared) -> tuple:
    r = prep.request
    return (prep.generator.info.id, r.model.hash if r.model else None, r.backend, r.device, str(r.export or ""),
            repr(sorted(r.options.items())), tuple((a.sha256, a.config_sha256, a.weight) for a in r.adapters))


def _save(prep: Prepared, result: Result, total_s: float, out_path, out_dir, history, overwrite: bool) -> Record:
    """Write a result's output and history row (engine.commit) and return its Record."""
    check_result(result, prep.generator.info, prep.plugin)
    own = result.info.pop("timings", None)  # a generator may report its own split (load, steps, ...)
    timings = {**(own if isinstance(own, dict) else {}), "total_s": total_s}
    recipe = recipe_of(prep, result, timings)
    if out_path is None and out_dir is None:
        from engine import state

        out_dir = state.load_settings().outputs
    if out_path is None:
        out_path = default_path(Path(out_dir), recipe, result)
    try:
        saved = commit.save(renderer(result, recipe), Path(out_path), recipe,
                            None if history is False else (history or History()), overwrite=overwrite)
    except StudioError as exc:
        exc.result_text = result.text  # the CLI still shows generated text that could not be saved
        raise
    recipe["path"] = str(saved.files[0])
    recipe["warnings"] += saved.notes
    if saved.unrecorded:
        recipe["warnings"].append(f"not recorded in the history: {saved.unrecorded} The output is saved at "
                                  f"{saved.files[0]}.")
    recipe["history_id"] = saved.history_id
    return Record(recipe, saved.files, saved.history_id, result)
