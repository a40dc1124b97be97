"""onnxruntime's optimized graph, saved once beside an export and reused (imports onnxruntime only).

Creating a session optimizes the graph (fusions, constant folding), which takes seconds for a large decoder. The
first session of an export graph therefore saves the optimized graph to ``<export>/.optimized/<graph>`` (its
weights in ``<graph>.data`` beside it, memory-mapped when opened) with ``<graph>.json``: the onnxruntime version,
the CPU, the sha256 of the export files it was made from and the stamps (size, time, sha256) of the saved files.
Later sessions open the saved graph with optimizations off. The saved graph is rebuilt, with a note, when
onnxruntime or the CPU differ or its files changed; when it cannot be written (no room, read-only folder) the
export still opens, optimized in memory at every load, with a note.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Optional

from engine.backends.runtime import check_graph, new_session, session_options
from engine.state import env_flag
from engine.errors import ModelError
from engine.filecheck import Check, check_file, read_ahead, stamp

log = logging.getLogger(__name__)

FOLDER = ".optimized"
HEADROOM = 1.2  # the saved graph is about the size of the export; ask for this much more free space


def cpu_id() -> str:
    """The CPU the graph was optimized for: machine and the CPU flags (an optimized graph may use them)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def source_key(manifest: dict) -> str:
    """The export files' recorded sha256s (already checked against the files by ``check_folder``)."""
    files = manifest.get("files", {})
    return hashlib.sha256(json.dumps({k: v.get("sha256") for k, v in sorted(files.items())
                                      if isinstance(v, dict)}).encode()).hexdigest()


def room_for(folder: Path, nbytes: int) -> bool:
    try:
        return shutil.disk_usage(folder).free >= nbytes * HEADROOM
    except OSError:
        return False


def _paths(graph: Path) -> tuple:
    cache = graph.parent / FOLDER
    return cache, cache / graph.name, cache / (graph.name + ".data"), cache / (graph.name + ".json")


def _saved_ok(graph: Path, want: dict, notes: list) -> bool:
    """Whether a saved optimized graph matches ``want`` (versions, CPU, source) and its files are unchanged."""
    cache, opt, data, meta_path = _paths(graph)
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, AssertionError, UnicodeDecodeError):
        notes.append(f"the saved optimized graph of {graph.name} was unreadable; it was rebuilt")
        return False
    if meta.get("onnxruntime") != want["onnxruntime"]:
        notes.append(f"the optimized graph of {graph.name} was saved by onnxruntime {meta.get('onnxruntime')}; "
                     f"it was rebuilt for onnxruntime {want['onnxruntime']} (a slower load, once)")
        return False
    if meta.get("cpu") != want["cpu"]:
        notes.append(f"the optimized graph of {graph.name} was saved on another CPU; it was rebuilt for this one")
        return False
    if meta.get("source") != want["source"]:
        return False  # the export was replaced: its old optimized graph is simply stale
    for name, recorded in files.items():
        if (name not in (opt.name, data.name) or not isinstance(recorded, dict)
                or check_file(cache / name, recorded) not in (Check.UNCHANGED, Check.VERIFIED)):
            notes.append(f"the saved optimized graph of {graph.name} changed on disk; it was rebuilt")
            return False
    return opt.name in files  # written by onnxruntime from the checked graph; its files are as recorded then


def _clear(cache: Path, graph: Path) -> None:
    for p in _paths(graph)[1:]:
        try:
            p.unlink()
        except OSError:
            pass


def prepacks(manifest: dict) -> bool:
    """Whether onnxruntime should repack the weights when the session opens. Quantized graphs: yes (MatMulNBits
    decoded about 25x slower unpacked in a one-off check). fp32 graphs: only with ``STUDIO_ONNX_PREPACK=1``, which the window's generation
    process sets (it keeps models loaded): packing copies every weight at every open (2.8 s of CPU for the 336M
    Llama, against 0.08 s), and buys a faster prefill (3.1 s against 5.5 s for 64 tokens) and decode step
    (639 against 722 ms) on this shared machine (benchmarks/load_time.py --prepack), which a one-shot CLI run
    pays back only for long prompts and outputs."""
    return bool(manifest.get("quantization")) or env_flag("STUDIO_ONNX_PREPACK", False)


def _options(threads, graph: Path, prepack: bool):
    so = session_options(threads, graph)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def optimized_session(graph: Path, manifest: dict, threads: Optional[int], allowed: set, notes: list):
    """A session on ``graph`` (a checked export's graph), through its saved optimized form when there is one."""
    import onnxruntime as ort

    graph = Path(graph)
    prepack = prepacks(manifest)
    cache, opt, data, meta_path = _paths(graph)
    want = {"onnxruntime": ort.__version__, "cpu": cpu_id(), "source": source_key(manifest)}
    if _saved_ok(graph, want, notes):
        read_ahead(data)
        so = _options(threads, graph, prepack)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return new_session(opt, so)
        except ModelError:
            notes.append(f"the saved optimized graph of {graph.name} did not open; it was rebuilt")
    check_graph(graph, allowed)
    size = sum(int(m.get("bytes", 0)) for m in manifest.get("files", {}).values() if isinstance(m, dict))
    so = _options(threads, graph, prepack)
    why = None
    try:
        cache.mkdir(exist_ok=True)
        _clear(cache, graph)
    except OSError as exc:
        why = f"its folder is not writable ({exc.strerror})"
    if why is None and not room_for(cache, size):
        why = f"the disk has less than {size * HEADROOM / 2**20:.0f} MB free"
    if why is not None:
        notes.append(f"the optimized graph of {graph.name} could not be saved beside the export ({why}); the "
                     "export works but is optimized again at every load, which is slower")
        return new_session(graph, so)
    so.optimized_model_filepath = str(opt)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = new_session(graph, so)
    except ModelError:
        _clear(cache, graph)
        if room_for(cache, size):
            raise
        notes.append(f"the optimized graph of {graph.name} could not be saved beside the export (the disk is "
                     "full); the export works but is optimized again at every load, which is slower")
        return new_session(graph, _options(threads, graph, prepack))
    try:
        files = {p.name: stamp(p) for p in (opt, data) if p.is_file()}
        meta_path.write_text(json.dumps({**want, "files": files}, indent=2), encoding="utf-8")
    except OSError as exc:
        _clear(cache, graph)
        notes.append(f"the optimized graph of {graph.name} could not be saved ({exc.strerror}); the export works "
                     "but is optimized again at every load")
    return session
