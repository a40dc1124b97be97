"""Finding, checking and opening ONNX exports. Imports onnxruntime, onnx and numpy only (never torch).

An export is a folder holding graphs and an ``onnx.json`` manifest. Before a session is created:
the manifest's files must be plain files inside the folder (no symlinks, no paths), of the size and sha256 the
manifest records; every graph must parse, pass ``onnx.checker`` and reference external data only in files of
its own folder. Anything else raises ``ModelError`` with one sentence.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from engine.errors import ModelError, UsageError
from engine.filecheck import Check, check_file

log = logging.getLogger(__name__)

MANIFEST = "onnx.json"
FORMAT = "genai-studio-onnx/1"


def builtin_dir() -> Path:
    from engine import state

    return state.BUILTIN_MODELS


def exports_home() -> Path:
    from engine import state

    return state.home() / "exports"


def is_builtin(folder: Path) -> bool:
    try:
        return Path(folder).resolve().parent == builtin_dir().resolve()
    except OSError:
        return False


def export_folders(model_folder: Path) -> list:
    """Export folders of a model: ``<model>/onnx*/`` and, for built-in models, ``$STUDIO_HOME/exports/<name>/onnx*/``.
    fp32 exports come before quantized ones."""
    model_folder = Path(model_folder)
    found = [p.parent for p in model_folder.glob("onnx*/" + MANIFEST)]
    for p in (exports_home() / model_folder.name).glob("onnx*/" + MANIFEST):
        if is_builtin(model_folder) or _records_builtin(p):
            found.append(p.parent)
    return sorted(found, key=lambda p: (variant(p) != "fp32", str(p)))


VARIANTS = ("fp32", "int8", "int4")


def variant(folder: Path) -> str:
    """"int8", "int4" or "fp32", from an export folder's name (onnx, onnx-int8, onnx-int4)."""
    name = Path(folder).name
    return next((v for v in VARIANTS[1:] if v in name), "fp32")


def _records_builtin(manifest_path: Path) -> bool:
    try:
        return bool(json.loads(manifest_path.read_text(encoding="utf-8"))["model"]["builtin"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a manifest this studio wrote (so an export may replace it)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {MANIFEST}; export the model again with `studio export-onnx`.") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise ModelError(f"{path} is not valid JSON; export the model again with `studio export-onnx --force`.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ModelError(f"{path} is not a manifest this studio wrote; export the model again.")
    return data


def _plain_name(name: str) -> bool:
    return bool(name) and name == os.path.basename(name) and name not in (".", "..") and "\\" not in name \
        and not os.path.isabs(name)


def _export_name(name: str) -> bool:
    """A file name in an export: ``file`` or ``component/file`` (Optimum's per-component folders), plain parts."""
    parts = str(name).split("/")
    return len(parts) <= 2 and all(_plain_name(p) for p in parts)


def check_folder(folder: Path, manifest: dict, verify_hashes: bool = True) -> list:
    """Every file the manifest names is a plain, non-symlinked file of the recorded size and sha256. The sha256 is
    computed only when the file's modification time differs from the one recorded at export (or none was
    recorded); returns notes for the files that had to be hashed that way."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ModelError(f"ONNX export folder {folder} is a symbolic link; only real export folders are loaded.")
    real = folder.resolve()
    notes = []
    for name, meta in manifest["files"].items():
        if not _export_name(name):
            raise ModelError(f"{folder / MANIFEST} names the file {name!r}, which is outside the export folder.")
        path = folder / name
        if path.is_symlink() or path.parent.is_symlink():
            raise ModelError(f"{path} is a symbolic link; an export may only hold its own files.")
        if not path.is_file():
            raise ModelError(f"ONNX export {folder} lacks the file {name} named in its manifest; export again.")
        if path.resolve().parent != (real / name).parent:
            raise ModelError(f"{path} lies outside the export folder; export the model again.")
        if not isinstance(meta, dict):
            raise ModelError(f"{folder / MANIFEST} has a damaged entry for {name}; export the model again.")
        if "bytes" in meta and path.stat().st_size != meta["bytes"]:
            raise ModelError(f"{path} has {path.stat().st_size} bytes but the manifest records {meta['bytes']} "
                             "(truncated or changed); export the model again.")
        found = check_file(path, meta, verify_hashes)
        if found is Check.CHANGED:
            raise ModelError(f"{path} does not match the sha256 in its manifest (corrupt or changed); "
                             "export the model again.")
        if found is Check.VERIFIED and meta.get("mtime_ns") is not None:
            notes.append(f"{name} in {folder.name} was touched since export (its time changed); its sha256 was "
                         "checked and matches")
    return notes


def check_graph(path: Path, allowed: Optional[set] = None, checker: bool = True) -> None:
    """Parse a graph, refuse external data outside its folder or through symlinks, run ``onnx.checker``."""
    try:
        import onnx
        from onnx import external_data_helper
    except ImportError:
        raise ModelError("The ONNX backend needs the onnx package to check graphs before loading them; "
                         "install it with `pip install onnx`.") from None
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise ModelError(f"ONNX graph {path} is missing or a symbolic link; export the model again.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelError(f"ONNX graph {path.name} is corrupt or truncated ({type(exc).__name__}); "
                         "export the model again.") from None
    folder = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = path.parent / location
        if (not _plain_name(location) or target.is_symlink() or not target.is_file()
                or target.resolve().parent != folder or (allowed is not None and location not in allowed)):
            raise ModelError(f"ONNX graph {path.name} refers to external data {location!r} outside its own "
                             "export folder; refusing to load it.")
    if not checker:
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"ONNX graph {path.name} fails the ONNX checker ({first[:200]}); export the model again.") from None


SMALL_GRAPH_BYTES = 64 << 20  # below this, one intra-op thread is faster (measured: docs/benchmarks_onnx.md)


def default_threads(path: Optional[Path] = None) -> int:
    """``STUDIO_ONNX_THREADS`` when set; else 1 for small graphs (their per-operator work is too small to share
    out: one thread measured about 2x faster for the built-in models) and every core for larger ones."""
    from engine.state import env_threads

    env = env_threads("STUDIO_ONNX_THREADS")
    if env > 0:
        return env
    if path is not None and Path(path).is_file() and _graph_bytes(Path(path)) < SMALL_GRAPH_BYTES:
        return 1
    return os.cpu_count() or 1


def _graph_bytes(path: Path) -> int:
    """A graph file's size with its external weights (``<graph>.data`` beside it)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def session_options(threads: Optional[int] = None, path: Optional[Path] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads(path)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("The ONNX backend needs onnxruntime; install it with `pip install onnxruntime`.") from None
    return ort


def new_session(path: Path, so):
    """An onnxruntime CPU session; its failure as a ModelError."""
    ort = _ort()
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load {Path(path).name} ({first[:200]}); export the model again.") from None


def open_session(path: Path, threads: Optional[int] = None, check: bool = True, allowed: Optional[set] = None):
    """An onnxruntime CPU session on a checked graph, optimized anew (``Export.session`` saves the optimized graph
    once beside the export and reuses it)."""
    _ort()
    if check:
        check_graph(path, allowed)
    return new_session(path, session_options(threads, path))


class Export:
    """An opened, checked export folder: its manifest and lazily created sessions by graph name.

    ``notes``: what a person may want to know about this load (files hashed because their time changed, the
    optimized graph rebuilt or not saved); generators pass them on as warnings."""

    def __init__(self, folder: Path, threads: Optional[int] = None, verify_hashes: bool = True,
                 save_optimized: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.notes = check_folder(self.folder, self.manifest, verify_hashes)
        for note in self.notes:
            log.warning("%s", note)
        self.threads = threads
        self.save_optimized = save_optimized
        self._sessions: dict = {}

    @property
    def graphs(self) -> dict:
        return self.manifest.get("graphs", {})

    def session(self, name: str):
        if name not in self._sessions:
            graph = self.graphs.get(name)
            if not isinstance(graph, dict) or not _export_name(str(graph.get("file", ""))):
                raise ModelError(f"ONNX export {self.folder} has no graph {name!r}; export the model again.")
            if graph["file"] not in self.manifest["files"]:
                raise ModelError(f"ONNX export {self.folder}: graph {graph['file']} is not listed in its manifest.")
            path = self.folder / graph["file"]
            sub = os.path.dirname(graph["file"])  # external data may only be files of the graph's own folder
            allowed = {os.path.basename(f) for f in self.manifest["files"] if os.path.dirname(f) == sub}
            before = len(self.notes)
            if self.save_optimized:
                from engine.backends.optimized import optimized_session

                self._sessions[name] = optimized_session(path, self.manifest, self.threads, allowed, self.notes)
            else:
                self._sessions[name] = open_session(path, self.threads, allowed=allowed)
            for note in self.notes[before:]:
                log.warning("%s", note)
        return self._sessions[name]


SPEED_ORDER = VARIANTS[::-1]  # fastest first (benchmarks/onnx_vs_torch.py: int8 3.2-3.5x torch fp32)


def gate_passed(manifest: dict) -> bool:
    """Whether the graphs of an export passed their gate: the parity gate for fp32 (and not kept by --force); for a
    quantized export, its own gate against fp32 (parity checks named ``*_int8`` / ``*_int4``), which older
    exports lack."""
    if manifest.get("parity_passed") is not True or manifest.get("forced"):
        return False
    quant = manifest.get("quantization")
    if not quant:
        return True
    if not isinstance(quant, dict):
        return False
    scheme = "int4" if quant.get("bits") == 4 else "int8"
    own = [v for k, v in (manifest.get("parity") or {}).items() if k.endswith("_" + scheme) and isinstance(v, dict)]
    return bool(own) and all(v.get("passed") is True for v in own)


def choose_export(model_folder: Path, gated_only: bool = False, legacy: bool = False,
                  model_hash: Optional[str] = None) -> Optional[Path]:
    """The export folder a model runs on: the fastest variant (int4, int8, fp32) that passed its gate (and, given
    ``model_hash``, was made from this version of the model); with ``gated_only`` None when none did, else the
    fp32 one. ``STUDIO_ONNX_VARIANT`` (fp32, int8, int4) picks a variant. ``legacy``: the rule of recipes that
    did not record their export (fp32 first)."""
    folders = export_folders(model_folder)
    want = os.environ.get("STUDIO_ONNX_VARIANT", "").strip().lower()
    if want and want not in VARIANTS:
        from engine.state import warn_once

        warn_once(f"STUDIO_ONNX_VARIANT={want!r} is not one of {', '.join(VARIANTS)}; it is ignored.")
    elif want:
        folders = [f for f in folders if variant(f) == want] or folders
    if legacy or not folders:
        return folders[0] if folders else None
    gated = []
    for f in folders:
        try:
            manifest = read_manifest(f)
            recorded = (manifest.get("model") or {}).get("hash")
            if gate_passed(manifest) and not (model_hash and recorded and recorded != model_hash):
                gated.append(f)
        except ModelError:
            continue
    if gated:
        return min(gated, key=lambda f: SPEED_ORDER.index(variant(f)))
    return None if gated_only else folders[0]


def open_export(model_folder: Path, model_hash: Optional[str] = None, threads: Optional[int] = None,
                export: Optional[Path] = None) -> Export:
    """The export ``export`` of a model folder (as the runner chose it: ``Request.export``), else the one
    ``choose_export`` prefers. An export made from another version of the model is refused."""
    folder = Path(export) if export is not None else choose_export(Path(model_folder))
    if folder is None:  # the same condition engine.runner.prepare refuses as a usage error
        raise UsageError(f"Model {Path(model_folder).name} has no ONNX export; run "
                         f"`studio export-onnx {Path(model_folder).name}` first.")
    opened = Export(folder, threads)
    made_from = opened.manifest.get("model") or {}
    recorded, name = made_from.get("hash"), Path(model_folder).name
    if model_hash and recorded and recorded != model_hash:
        what = f"model {made_from['name']}" if made_from.get("name") not in (None, name) else \
            f"another version of model {name}"
        raise ModelError(f"The ONNX export in {folder} was made from {what}; export this one again with "
                         f"`studio export-onnx {name}`.")
    return opened
