"""Reading model weights from a Hugging Face style folder (safetensors only).

``load_state_dict(folder)`` returns ``{name: torch.Tensor}`` from ``model.safetensors`` or from the shards
listed in ``model.safetensors.index.json``. Anything missing or unreadable raises ``ModelError``.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def find_weight_files(folder) -> list[Path]:
    """The safetensors files of a model folder, in load order, or [] when it has none. The one rule for which
    files hold a model's weights (loading, hashing and importing all use it): ``model.safetensors`` when present
    (as transformers prefers it), else the shards that ``model.safetensors.index.json`` names."""
    folder = Path(folder)
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    index = folder / INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"{index} is not a valid safetensors index; re-download or re-export the model.") from None
    files = [folder / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"Model folder {folder} lacks the weight shard {missing[0]} listed in {INDEX}.")
    return files


def weight_files(folder) -> list[Path]:
    """``find_weight_files``, with a ModelError that says what is wrong when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"Model folder {folder} does not exist.")
    files = find_weight_files(folder)
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ModelError(f"Model folder {folder} has only pickle weights; convert them to model.safetensors first.")
    raise ModelError(f"Model folder {folder} has no {SINGLE} (or {INDEX}).")


def load_state_dict(folder, device: str = "cpu") -> dict:
    """All tensors of the folder's safetensors file(s) as a dict; ModelError on missing or corrupt files."""
    from safetensors.torch import load_file

    from engine.filecheck import read_ahead

    state = {}
    for path in weight_files(folder):
        read_ahead(path)  # the tensors are mapped; have the kernel read the file in order meanwhile
        try:
            part = load_file(str(path), device=device)
        except Exception as exc:  # safetensors raises its own error types and OSError
            raise ModelError(f"Weight file {path} is corrupt or unreadable ({type(exc).__name__}); "
                             "re-download or re-export the model.") from None
        state.update(part)
    return state


def read_shapes(folder) -> dict:
    """``{name: (shape tuple, dtype str)}`` read from the safetensors headers only (no tensor data)."""
    import struct

    shapes = {}
    for path in weight_files(folder):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    shapes[name] = (tuple(meta["shape"]), meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            raise ModelError(f"Weight file {path} is corrupt or unreadable; re-download or re-export the model.") from None
    return shapes


def no_init():
    """A context in which torch's weight initialisers (``torch.nn.init.*_``) do nothing: a model built inside it
    has uninitialised (allocated but never touched) parameters, for ``load_state_dict(..., assign=True)`` to
    replace with the file's tensors. Saves randomly initialising a model that is about to be overwritten (and,
    unlike building on the meta device, imports nothing more)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        init = torch.nn.init
        names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
        saved = {n: getattr(init, n) for n in names}
        for n in names:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        try:
            yield
        finally:
            for n, fn in saved.items():
                setattr(init, n, fn)

    return ctx()


def load_pickle(path, map_location="cpu"):
    """A PyTorch pickle (a checkpoint, .pt/.bin/.ckpt weights) loaded the one safe way: ``weights_only=True``,
    which builds tensors and plain containers and runs no code from the file. ModelError, in one line, for a file
    that needs more than that (it may carry code) or that is damaged."""
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on its way to refusing
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist.") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln or "unsupported" in ln]
        why = (lines[0] if lines else type(exc).__name__)[:160]
        raise ModelError(f"{path.name} was refused: it holds more than tensors and plain data, which could run code "
                         f"when loaded, or it is damaged ({why}).") from None


def check_shapes(found: dict, expected: dict, where: str, optional=()) -> None:
    """ModelError unless the weights ``found`` ({name: shape}) are exactly those ``expected`` of the model a config
    builds (``optional`` ones may be absent, as a tied output layer); ``where`` names the file or part."""
    def first(names: list) -> str:
        return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")

    missing = sorted(k for k in expected if k not in found and k not in optional)
    if missing:
        raise ModelError(f"{where}: the weight {first(missing)} is missing; the weights do not belong to this config.")
    unexpected = sorted(k for k in found if k not in expected)
    if unexpected:
        raise ModelError(f"{where}: the weight {first(unexpected)} is not part of this model; the weights do not "
                         "belong to this config.")
    for k, shape in found.items():
        if tuple(shape) != tuple(expected[k]):
            raise ModelError(f"{where}: the weight {k} has shape {tuple(shape)} but the config implies "
                             f"{tuple(expected[k])}; the weights do not belong to this config.")


def match_state_dict(module, sd: dict, what: str) -> None:
    """ModelError unless ``sd`` has exactly ``module``'s tensor names and shapes (``what`` names the part)."""
    check_shapes({k: v.shape for k, v in sd.items()}, {k: v.shape for k, v in module.state_dict().items()},
                 f"The {what} weights")
