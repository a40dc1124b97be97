"""The model store: built-in models (read-only, ``resources/models``) and user models (``$STUDIO_HOME/models``).

A model folder follows the Hugging Face layout (``config.json``, safetensors
weights, ``tokenizer.json``) plus the studio's ``studio.json``. The family is
recognised through the architectures plugins register.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine import state
from engine.tokenizer import has_tokenizer
from engine.weights import find_weight_files, load_pickle
from engine.configs import read_json
from engine.outputs import feed
from engine.errors import ModelError, StateError, UsageError
from engine.generators import ModelRef
from engine.plugins import PluginHost
from engine.jobsave import remove_dead_scratch, scratch_folder

log = logging.getLogger(__name__)
# files a model folder may hold as symbolic links (the Hugging Face cache links snapshots to blobs); other links
# are left out of an import, since they may point anywhere
LINKABLE = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "vocab.txt", "special_tokens_map.json", "preprocessor_config.json", "chat_template.jinja",
            "model.safetensors.index.json", "tokenizer.model", "added_tokens.json", "studio.json"}

BUILTIN_DIR = state.BUILTIN_MODELS
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# tokenizer_config.json is left out: the chat template of a built-in model may change without changing its hash
HASHED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt")


@dataclass
class ModelEntry:
    name: str
    path: Path
    family: str
    generator: str
    builtin: bool
    hash: str
    size_bytes: int
    title: str = ""
    config: dict = field(default_factory=dict)
    studio: dict = field(default_factory=dict)
    changed: str = ""  # a note when the files are no longer the ones imported (their hash then is the new one)

    @property
    def size_text(self) -> str:  # "1.2 GB", as the model lists (CLI and window) show it
        size = float(self.size_bytes)
        for unit in ("B", "KB", "MB", "GB"):
            if size < 1024 or unit == "GB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        return f"{self.size_bytes} B"

    @property
    def onnx(self) -> list:
        """Registered ONNX exports: folders beside the weights holding an ``onnx.json`` manifest (for built-in
        models, whose folder is read-only: ``$STUDIO_HOME/exports/<name>/onnx*``, listed as absolute paths)."""
        from engine.backends.runtime import export_folders  # the one rule for where a model's exports are

        found = export_folders(self.path)
        return [str(p.relative_to(self.path)) if p.is_relative_to(self.path) else str(p) for p in found]

    def option_defaults(self) -> dict:
        """Generation settings of the folder's ``generation_config.json`` under the option names generators use
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams); greedy (do_sample false) is
        temperature 0."""
        return generation_defaults(self.path)

    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.path, self.family, self.hash, self.config, self.studio)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "family": self.family, "generator": self.generator, "builtin": self.builtin,
            "hash": self.hash, "size_bytes": self.size_bytes, "title": self.title, "path": str(self.path),
            "onnx": self.onnx, "scores": self.studio.get("scores", {}), "changed": self.changed,
            "autov2": self.studio.get("autov2", ""),
        }


def check_safetensors(path: Path) -> None:
    """Open the header and check that every tensor lies inside the file (truncation, corruption)."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > size - 8:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError("file size does not match its header (truncated?)")
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise ModelError(f"Weights file {path.name} is corrupt or truncated ({exc}); copy it again.") from None


def content_hash(folder: Path) -> str:
    """sha256 over the config, tokenizer and weight files (names and bytes), in a fixed order."""
    h = hashlib.sha256()
    files = [folder / n for n in HASHED_FILES if (folder / n).exists()] + find_weight_files(folder)
    for path in files:
        h.update(path.name.encode() + b"\0")
        feed(h, path)
    return h.hexdigest()


# files beside the weights that change how a model reads its input but are not in its hash (adding them would
# change every imported model's hash): recorded apart, so a replay can say they changed
SIDE_FILES = ("preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def side_hash(folder: Path) -> str:
    """sha256 over the SIDE_FILES a model folder has (names and bytes); "" when it has none."""
    files = [Path(folder) / n for n in SIDE_FILES if (Path(folder) / n).is_file()]
    if not files:
        return ""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        feed(h, path)
    return h.hexdigest()


GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams")


def read_generation_config(folder) -> dict:
    """``generation_config.json`` as a dict; {} when absent or not a JSON object (with a log line)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ModelError as exc:
        log.warning("%s The model's generation settings are ignored.", exc)
        return {}


def generation_defaults(folder) -> dict:
    gen = read_generation_config(folder)
    out = {k: gen[k] for k in GENERATION_KEYS if isinstance(gen.get(k), (int, float)) and not isinstance(gen[k], bool)}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def fingerprint(folder: Path) -> dict:
    """{file name: [size, mtime_ns]} of the hashed files: a cheap sign that the content may have changed."""
    files = [folder / n for n in HASHED_FILES if (folder / n).exists()] + find_weight_files(folder)
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


SCRATCH = ".import-"  # the scratch folders of imports and conversions in the store (engine.jobsave.scratch_folder)
STUDIO_KEYS = {"hash": str, "fingerprint": dict, "title": str, "family": str, "generator": str, "default": bool,
               "imported_from": str, "autov2": str, "scores": dict}


def studio_json(folder: Path) -> dict:
    """A model folder's studio.json ({} when there is none), without the values of a wrong type (a folder brought
    from elsewhere with ``"hash": 5`` broke every listing and so every generation); ModelError when unreadable."""
    if not (folder / "studio.json").exists():
        return {}
    studio = read_json(folder / "studio.json", "a studio.json")
    bad = [k for k, kind in STUDIO_KEYS.items() if k in studio and not isinstance(studio[k], kind)]
    if bad:
        log.warning("Ignoring %s in %s: not of the type the studio writes.", ", ".join(bad), folder / "studio.json")
    return {k: v for k, v in studio.items() if k not in bad}


class ModelStore:
    def __init__(self, host: PluginHost, builtin_dir: Path = BUILTIN_DIR, user_dir: Optional[Path] = None):
        self.host = host
        self.builtin_dir = builtin_dir
        self.user_dir = user_dir or state.home() / "models"
        self._hashes: dict = {}

    # ----- reading ---------------------------------------------------------------------------
    def _entry(self, folder: Path, builtin: bool) -> ModelEntry:
        config = read_json(folder / "config.json", "a config.json")
        studio = studio_json(folder)
        arch = self.host.architecture_for(config)
        family = arch.family if arch else studio.get("family", "unknown")
        generator = arch.generator if arch else studio.get("generator", "")
        files = find_weight_files(folder)
        key = (str(folder), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
        if key not in self._hashes:
            recorded = studio.get("hash") if not builtin else None
            same = recorded and studio.get("fingerprint") == fingerprint(folder)  # unchanged size and mtime
            self._hashes[key] = recorded if same else content_hash(folder)
        digest, changed = self._hashes[key], ""
        if not builtin and studio.get("hash") and digest != studio["hash"]:
            changed = (f"the files of {folder.name} changed after it was imported (hash {studio['hash'][:12]} at "
                       f"import, {digest[:12]} now)")
        size = sum(f.stat().st_size for f in files)
        return ModelEntry(folder.name, folder, family, generator, builtin, digest, size,
                          studio.get("title", folder.name), config, studio, changed)

    def list(self) -> list[ModelEntry]:
        out = []
        for base, builtin in ((self.builtin_dir, True), (self.user_dir, False)):
            if not base.is_dir():
                continue
            for folder in sorted(base.iterdir()):
                if folder.name.startswith("."):
                    continue  # an import or export under way (or killed: removed by the next import)
                try:
                    if folder.is_dir() and (folder / "config.json").exists():
                        out.append(self._entry(folder, builtin))
                except ModelError as exc:
                    log.warning("Skipping model %s: %s", folder, exc)
                except OSError as exc:  # removed or replaced by another process while being read
                    log.info("Skipping model %s: %s", folder, exc)
        return out

    def get(self, name_or_path: str) -> ModelEntry:
        """A model by store name, or a model folder path used in place (not imported)."""
        entries = self.list()
        for entry in entries:
            if entry.name == name_or_path:
                return entry
        path = Path(name_or_path).expanduser()
        if path.exists() and (path.suffix.lower() == ".gguf" or self._importer(path) is not None):
            raise UsageError(f"{path} is converted when imported, not used in place: run `studio models import "
                             f"{name_or_path}` once, then give its name to --model.")
        if path.is_dir():
            self.validate(path)
            return self._entry(path.resolve(), builtin=False)
        known = ", ".join(e.name for e in entries) or "none"
        raise UsageError(f"Unknown model {name_or_path!r}; known models: {known} (or give a model folder path).")

    def default_for(self, generator_id: str, families: tuple = ()) -> Optional[ModelEntry]:
        """The model a generator uses when none is named: its own, else one of the families it runs (``chat``
        runs the ``text`` family's models)."""
        entries = [e for e in self.list() if e.generator == generator_id]
        entries = entries or [e for e in self.list() if e.family in families]
        entries.sort(key=lambda e: (not e.builtin, not e.studio.get("default", False), e.name))
        return entries[0] if entries else None

    # ----- checking and importing ------------------------------------------------------------
    def validate(self, folder: Path, trust: bool = False):
        """Check a model folder; return its architecture. Raises ModelError with a one-line reason."""
        if not folder.is_dir():
            raise ModelError(f"{folder} is not a folder; give the path of a model folder.")
        config = read_json(folder / "config.json", "a config.json")
        files = find_weight_files(folder)
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not files and pickles and not trust:
            raise ModelError(
                f"{folder.name} holds only pickle weights ({pickles[0].name}), which can run code when loaded; "
                "pass --trust if you trust this file.")
        if not files and not pickles:
            raise ModelError(f"{folder.name} has no weights: expected model.safetensors (or shards with an index).")
        for f in files:
            check_safetensors(f)
        arch = self.host.architecture_for(config)
        if arch is None:
            kind = config.get("model_type", "not given")
            known = ", ".join(sorted(self.host.architectures)) or "none"
            raise ModelError(f"{folder.name} is of an unknown model family {kind!r} (config.json model_type); "
                             f"supported: {known}.")
        if arch.needs_tokenizer and not has_tokenizer(folder):
            raise ModelError(f"{folder.name} has no tokenizer.json (nor vocab.json and merges.txt), which a "
                             f"{arch.family} model needs.")
        if files:
            arch.verify(folder)
        return arch

    @staticmethod
    def import_name(source: Path) -> str:
        """The name an import of ``source`` gets when none is given: a file's stem, a folder's own name (`import .`
        is named after the folder; a symbolic link by its own name, not its target's)."""
        source = Path(source).expanduser()
        return source.stem if source.is_file() else Path(os.path.normpath(source.absolute())).name

    def free_name(self, name: str) -> str:
        """``name`` made a valid model name that no model has yet (``name-2``, ``name-3``, ...)."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:58] or "model"
        taken = {e.name for e in self.list()}
        if self.user_dir.is_dir():  # a folder there that is no model still takes its name
            taken |= {p.name for p in self.user_dir.iterdir()}
        return next(n for n in itertools.chain([base], (f"{base}-{i}" for i in itertools.count(2))) if n not in taken)

    def name_problem(self, name: str) -> str:
        """Why ``name`` cannot be a new model's name ("" when it can)."""
        if not NAME_RE.match(name):
            return f"Model name {name!r} may use letters, digits, '.', '_' and '-' only (up to 64)."
        if any(e.name == name for e in self.list()):
            return f"A model called {name!r} already exists."
        if (self.user_dir / name).exists():
            return f"The model store already holds a folder called {name!r} (not a model the studio lists)."
        return ""

    def _importer(self, path: Path):
        """The importer that converts ``path``; none for a folder a registered architecture reads as it is (a
        plugin's importer that claims everything must not take a plain model folder from its family)."""
        if path.is_dir() and (path / "config.json").is_file():
            try:
                if self.host.architecture_for(read_json(path / "config.json", "a config.json")) is not None:
                    return None
            except ModelError:
                pass
        return self.host.importer_for(path)

    def import_(self, source: Path, name: Optional[str] = None, trust: bool = False) -> ModelEntry:
        if not str(source).strip():  # (Path("") is the current folder)
            raise UsageError("No path was given; give the path of a model folder or file.")
        source = Path(source).expanduser()
        if not source.exists():  # a usage error, as a missing --image is; not "is not a folder"
            raise UsageError(f"{source} does not exist; give the path of a model folder or file.")
        if source.suffix.lower() == ".gguf" and source.is_file():
            return self._import_gguf(source, name)
        importer = self._importer(source)
        if importer is not None:
            return self._import_converted(source, name or self.import_name(source),
                                          lambda dest: importer.convert(source, dest, trust))
        name = name or self.import_name(source)
        if not NAME_RE.match(name):
            raise UsageError(f"Model name {name!r} may use letters, digits, '.', '_' and '-' only (up to 64).")
        if any(e.name == name for e in self.list()):
            raise UsageError(f"A model called {name!r} already exists; pass --name to choose another.")
        arch = self.validate(source, trust=trust)
        state.ensure_dir(self.user_dir)
        remove_dead_scratch(self.user_dir, SCRATCH)
        tmp = scratch_folder(self.user_dir, SCRATCH)
        try:
            links = []
            for item in source.iterdir():
                if item.is_symlink() and not (item.name in LINKABLE or item.suffix == ".safetensors"):
                    links.append(item.name)  # a link may point anywhere (notes.txt -> /etc/shadow): not copied
                elif item.is_file() and item.suffix not in PICKLE_SUFFIXES:
                    shutil.copy2(item, tmp / item.name)  # a model file linked into a snapshot (the HF cache) is read
            if links:
                log.warning("Left out %s: symbolic links other than the model's own files are not copied into the "
                            "model store.", ", ".join(sorted(links)))
            if not find_weight_files(tmp):
                _convert_pickles(source, tmp)
                self.validate(tmp)
            studio = studio_json(tmp)
            studio.update({"family": arch.family, "generator": arch.generator, "hash": content_hash(tmp),
                           "fingerprint": fingerprint(tmp), "imported_from": str(source.resolve())})
            studio.setdefault("title", name)
            (tmp / "studio.json").write_text(json.dumps(studio, indent=2))
            try:
                tmp.rename(self.user_dir / name)
            except OSError as exc:
                if (self.user_dir / name / "config.json").exists():  # another import of the same name won the race
                    raise UsageError(f"A model called {name!r} was imported meanwhile by another process; pass "
                                     "--name to choose another.") from None
                raise StateError(f"Cannot import as {name}: {self.user_dir / name} already exists and is not a model "
                                 f"the studio lists ({exc.strerror}); pass --name to choose another name, or move "
                                 "that folder away.") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(name)

    def _import_gguf(self, source: Path, name: Optional[str]) -> ModelEntry:
        """A GGUF file: converted into a model folder (engine/gguf.py), which is then imported as any folder."""
        from engine.gguf import gguf_to_folder

        return self._import_converted(source, name or self.import_name(source),
                                      lambda dest: gguf_to_folder(source, dest))

    def _import_converted(self, source: Path, name: str, convert) -> ModelEntry:
        """Import what ``convert(dest)`` writes into a scratch folder (removed afterwards, also on failure), with
        ``source`` recorded as where it came from."""
        if not NAME_RE.match(name):
            raise UsageError(f"Model name {name!r} may use letters, digits, '.', '_' and '-' only (up to 64); "
                             "pass --name.")
        if any(e.name == name for e in self.list()):
            raise UsageError(f"A model called {name!r} already exists; pass --name to choose another.")
        state.ensure_dir(self.user_dir)
        remove_dead_scratch(self.user_dir, SCRATCH)
        work = scratch_folder(self.user_dir, SCRATCH)
        try:
            folder = work / name
            folder.mkdir()
            convert(folder)
            entry = self.import_(folder, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        studio_path = entry.path / "studio.json"
        studio = read_json(studio_path, "")
        studio["imported_from"] = str(source.resolve())
        studio_path.write_text(json.dumps(studio, indent=2))
        return self.get(name)

    def remove(self, name: str) -> None:
        if not name.strip():
            raise UsageError("Give the name of the model to remove (`studio models list` shows them).")
        folder = self.user_dir / name
        if NAME_RE.match(name) and folder.is_dir() and not folder.is_symlink():  # also one too damaged to list
            shutil.rmtree(folder)
            return
        entry = self.get(name)
        if entry.builtin:
            raise UsageError(f"{name} is a built-in model and cannot be removed.")
        if entry.path.parent.resolve() != self.user_dir.resolve():
            raise UsageError(f"{name} is not in the model store; nothing was removed.")
        shutil.rmtree(entry.path)


def _convert_pickles(source: Path, dest: Path) -> None:
    """Load trusted pickle weights with ``weights_only=True`` and store them as safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for path in sorted(source.iterdir()):
        if path.suffix in PICKLE_SUFFIXES:
            data = load_pickle(path)
            if isinstance(data, dict) and "state_dict" in data:
                data = data["state_dict"]
            if not isinstance(data, dict):
                raise ModelError(f"{path.name} does not hold a state dict of tensors.")
            tensors.update({k: v.detach().clone().contiguous() for k, v in data.items() if isinstance(v, torch.Tensor)})
    save_file(tensors, str(dest / "model.safetensors"))
