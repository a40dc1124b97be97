"""The generator contract: option specs, requests, events and results.

A generator is plain data (``GeneratorInfo``) plus a ``generate(request,
context)`` callable that yields ``Progress`` and ``Partial`` events and one
``Result``. Nothing here imports torch or Qt.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from engine.errors import OptionError, CancelledError, UsageError

OPTION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# what a job, the settings, the command line and the window may ask for; ``auto`` is resolved by engine.runner
BACKENDS = ("auto", "torch", "onnx")
DEVICES = ("auto", "cpu", "cuda")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # bool options, on/off variables
# numbers as a person types them: ASCII digits, no "1_000" (Python reads "0_5" as 5) and no other scripts' digits
WHOLE = re.compile(r"[+-]?[0-9]+")
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def digits(text: str) -> bool:
    """True for a non-empty run of ASCII digits (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class Option:
    """One option of a generator: the GUI builds a form from these, the CLI validates ``--set``."""

    name: str
    type: str  # "int" | "float" | "str" | "bool"
    default: Any
    help: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[tuple] = None

    def __post_init__(self):
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of {sorted(OPTION_TYPES)}")
        if not self.name.isidentifier():
            raise ValueError(f"option name {self.name!r} is not a valid identifier")
        self.parse(self.default)  # the default itself must be valid

    def parse(self, value: Any) -> Any:
        """Turn ``value`` (a string from the command line, or a typed value) into this option's type."""
        kind = OPTION_TYPES[self.type]
        if isinstance(value, str) and kind is not str:
            text = value.strip()
            try:
                if kind is bool:
                    if text.lower() in TRUE_WORDS:
                        value = True
                    elif text.lower() in FALSE_WORDS:
                        value = False
                    else:
                        raise ValueError
                elif not (WHOLE if kind is int else DECIMAL).fullmatch(text):
                    raise ValueError
                else:
                    value = kind(text)
            except ValueError:
                raise OptionError(f"Option {self.name} must be {_article(self.type)}, not {_shown(value)}.") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise OptionError(f"Option {self.name} must be {_article(self.type)}, not {_shown(value)}.")
        if kind is float and (value != value or value in (float("inf"), float("-inf"))):
            raise OptionError(f"Option {self.name} must be a finite number, not {value}.")
        if self.min is not None and value < self.min:
            raise OptionError(f"Option {self.name} must be at least {self.min}, not {value}.")
        if self.max is not None and value > self.max:
            raise OptionError(f"Option {self.name} must be at most {self.max}, not {value}.")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"Option {self.name} must be one of {', '.join(map(str, self.choices))}; got {value!r}.")
        return value

    def to_dict(self) -> dict:
        return {
            "name": self.name, "type": self.type, "default": self.default, "help": self.help,
            "min": self.min, "max": self.max, "choices": list(self.choices) if self.choices else None,
        }


def _shown(value) -> str:
    """A wrong value as a message quotes it: a pasted 5000-digit number or page of text is cut."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _article(type_name: str) -> str:
    return {"int": "a whole number", "float": "a number", "str": "text", "bool": "true or false"}[type_name]


@dataclass(frozen=True)
class GeneratorInfo:
    """What a generator is, as plain data."""

    id: str
    title: str
    description: str
    takes: tuple  # subset of ("text", "image", "mask", "messages"); "messages": a conversation (request.messages);
    # "mask": an inpainting mask beside the image (request.mask, white = repaint), always optional
    makes: str  # "text" | "image" | "audio"
    options: tuple = ()
    families: tuple = ()  # model families it runs; empty means it needs no model
    icon: Optional[str] = None  # a path, or None for a default icon
    prompt_required: bool = True  # for generators that take text
    takes_lora: bool = False  # whether request.adapters (LoRA files, `--lora FILE[:WEIGHT]`) are applied
    image_required: bool = True  # for generators that take "image": False when they also work without one

    def __post_init__(self):
        if not self.id.replace("-", "_").isidentifier():
            raise ValueError(f"generator id {self.id!r} must be a short identifier such as 'text'")
        if not set(self.takes) <= {"text", "image", "mask", "messages"} or not self.takes:
            raise ValueError(f"generator {self.id!r}: takes must be a non-empty subset of ('text', 'image', "
                             "'mask', 'messages')")
        if "mask" in self.takes and "image" not in self.takes:
            raise ValueError(f"generator {self.id!r}: a generator that takes a mask must take an image too")
        if self.makes not in ("text", "image", "audio"):
            raise ValueError(f"generator {self.id!r}: makes must be 'text', 'image' or 'audio'")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"generator {self.id!r}: option names repeat")
        for o in self.options:
            if not isinstance(o, Option):
                raise ValueError(f"generator {self.id!r}: options must be engine.generators.Option instances")

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        known = ", ".join(o.name for o in self.options) or "none"
        raise OptionError(f"Generator {self.id} has no option {name!r} (known options: {known}).")

    def resolve_options(self, given: dict) -> dict:
        """Defaults overlaid with ``given``, every value parsed and checked."""
        out = {o.name: o.default for o in self.options}
        for name, value in given.items():
            out[name] = self.option(name).parse(value)
        return out

    def to_dict(self) -> dict:
        return {
            "id": self.id, "title": self.title, "description": self.description,
            "takes": list(self.takes), "makes": self.makes, "families": list(self.families),
            "options": [o.to_dict() for o in self.options], "takes_lora": self.takes_lora,
        }


@dataclass(frozen=True)
class ModelRef:
    """A model from the store, as a generator sees it."""

    name: str
    path: Path
    family: str
    hash: str
    config: dict = field(default_factory=dict)
    studio: dict = field(default_factory=dict)  # contents of studio.json


# a LoRA folder's weights file: PEFT's, else the one diffusers' save_lora_weights writes
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


def adapter_weights(path: Path) -> Path:
    """The weights file of a LoRA given as a file, or as a folder (PEFT's or diffusers' layout)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return next((path / n for n in ADAPTER_WEIGHT_FILES if (path / n).is_file()), path / ADAPTER_WEIGHT_FILES[0])


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA file or PEFT folder to apply, as the recipe records it: name, path, content hash (a PEFT folder's
    weights file), weight, and a PEFT folder's adapter_config.json hash (its alpha and targets change the output)."""

    name: str
    path: Path
    sha256: str
    weight: float = 1.0
    config_sha256: str = ""

    def to_dict(self) -> dict:
        d = {"name": self.name, "path": str(self.path), "sha256": self.sha256, "weight": self.weight}
        return {**d, "config_sha256": self.config_sha256} if self.config_sha256 else d


@dataclass
class Request:
    prompt: Optional[str] = None
    image: Optional[Path] = None
    mask: Optional[Path] = None  # an inpainting mask for ``image`` (white = repaint), for generators taking "mask"
    options: dict = field(default_factory=dict)  # already resolved: every option present and valid
    seed: int = 0
    model: Optional[ModelRef] = None
    backend: str = "torch"  # resolved: "torch" | "onnx"
    device: str = "cpu"  # resolved: "cpu" | "cuda"
    adapters: tuple = ()  # AdapterRef, applied in order (only for generators with info.takes_lora)
    export: Optional[Path] = None  # with the onnx backend: the export folder the runner chose (open_export(export=))
    messages: tuple = ()  # engine.chat.Message (role, content), for generators that take "messages"


class CancelToken:
    """A flag set by whoever wants the generation stopped; generators check it between steps."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError("Generation was cancelled.")


MERGE_FIRST = "merge them into a model first (`studio models merge-lora`) and run that on ONNX"  # Context.loaded


@dataclass
class Context:
    cancel: CancelToken = field(default_factory=CancelToken)
    cache: dict = field(default_factory=dict)  # loaded models, shared between generations by the host

    def cached(self, key, load: Callable[[], Any]) -> Any:
        """``cache[key]``, made by ``load()`` the first time: a loaded model kept for the next generations."""
        if key not in self.cache:
            self.cache[key] = load()
        return self.cache[key]

    def loaded(self, kind: str, request: Request, load: Callable[[], Any],
               onnx_lora: str = "leave out --backend onnx to use them") -> Any:
        """The request's model as ``load()`` makes it, kept for the next generations under all that decides it:
        ``kind`` (what is loaded: "text", "image", ...), the model's hash, device, backend, ONNX export and LoRA
        adapters with their weights. LoRA adapters on the onnx backend are refused first, in one sentence ending
        with ``onnx_lora`` (what to do)."""
        if request.adapters and request.backend == "onnx":
            raise UsageError(f"LoRA adapters run on the torch backend; {onnx_lora}.")
        key = (kind, request.model.hash, request.device, request.backend, str(request.export or ""),
               tuple((a.sha256, a.config_sha256, a.weight) for a in request.adapters))
        return self.cached(key, load)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class Partial:
    """A streamed piece: ``text`` (a token's text) or ``image`` (a PIL preview)."""

    text: Optional[str] = None
    image: Any = None


@dataclass
class Result:
    """The final content. The host adds the recipe (generator, model, seed, ...) around it."""

    text: Optional[str] = None
    token_ids: Optional[list] = None
    image: Any = None  # PIL.Image
    audio: Any = None  # (numpy array, sample_rate)
    warnings: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # extra facts for the recipe (e.g. timings, truncation)


Event = Union[Progress, Partial, Result]


def timed(events: Iterator, load_s: float) -> Iterator:
    """``events`` passed through, the Result's info given ``timings``: {"load_s": ``load_s``, "generate_s": its
    own "seconds"} (the host adds "total_s")."""
    for event in events:
        if isinstance(event, Result):
            event.info["timings"] = {"load_s": round(load_s, 4), "generate_s": event.info.get("seconds")}
        yield event


GenerateFn = Callable[[Request, Context], Iterator[Event]]


BatchFn = Callable[[list, Context], list]


@dataclass(frozen=True)
class Generator:
    info: GeneratorInfo
    generate: GenerateFn
    # Optional: ``batch(requests, context) -> list`` runs requests that differ only in their input and seed (same
    # model, options, backend) in one pass, e.g. a folder of images or a file of prompts; one Result or StudioError
    # per request, in order.
    batch: Optional[BatchFn] = None


@dataclass(frozen=True)
class Trainer:
    """A training command a plugin brings: ``studio train KIND [ARGS...]`` calls ``run(args)`` and exits with the
    int it returns. ``run`` parses its own arguments (``--help`` included) and imports torch itself."""
    kind: str
    title: str
    run: Callable[[list], int]
    # For a fine-tuner, what the GUI's fine-tune page needs, as data (``run`` stays the whole command):
    options: tuple = ()  # Option: its hyper-parameters; each is also the command's ``--name-with-dashes`` flag
    data: str = ""  # what its --data is: "text" (.txt files or one file) | "images" (images + same-named .txt)
    generator: str = ""  # the generator whose models it fine-tunes and that applies the adapter it makes


def finetuner(kind: str, title: str, module: str, data: str, generator: str) -> Trainer:
    """The Trainer of ``studio finetune KIND``: ``module.main`` runs it; ``module.OPTIONS`` (plain data, imported
    now: the module must import torch only when it runs) are its hyper-parameters."""
    import importlib

    return Trainer(kind, title, lazy(module, "main"), options=importlib.import_module(module).OPTIONS, data=data,
                   generator=generator)


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported at its first call: what a plugin registers (an exporter, a trainer's run, a
    generate function) without importing torch when it registers."""
    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"{module}.{name}"
    return call
