"""``studio export-onnx``: export a model through its family's registered exporter, gate it on parity with
PyTorch, and write the manifest ``onnx.json`` beside the graphs.

Where: ``--out DIR``; else ``<model folder>/onnx`` (``onnx-int8`` / ``onnx-int4`` when quantized) for user models, and
``$STUDIO_HOME/exports/<model>/onnx[-int8|-int4]`` for built-in models (their folder is read-only). The export is
written into a temporary sibling folder and renamed into place at the end, so nothing half-written is left;
an existing destination is replaced only if it is an earlier export (it holds this studio's manifest).

Every graph's weights are moved to ``<graph>.data`` beside it, page-aligned (``backends.common.externalize``), so
onnxruntime maps them at load; the manifest records each file's size, modification time and sha256, so a load
hashes only files whose time changed (``engine.filecheck``).

The exporter contract (its options and what it returns) is documented once, in ``engine/hookspecs.py``
(``register_exporters``); the parity gate is ``Gate`` below, run once per export.
"""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Callable, Optional

from engine.errors import ModelError, ParityError, UsageError
from engine.backends.runtime import FORMAT, MANIFEST, export_folders, exports_home, is_export, read_manifest
from engine.filecheck import stamp
from engine.jobsave import remove_dead_scratch, scratch_folder

QUANTIZE = (None, "int8", "int4")


def default_out_dir(entry, quantize: Optional[str]) -> Path:
    name = f"onnx-{quantize}" if quantize else "onnx"
    if entry.builtin:
        return exports_home() / entry.name / name
    return Path(entry.path) / name


def _failed(fig: dict) -> bool:
    diff, tol = fig.get("max_abs_diff"), fig.get("tolerance")
    return fig.get("passed") is False or (diff is not None and tol is not None and not diff <= tol)


def parity_failures(parity: dict) -> list:
    """One phrase per failed check, with its figures."""
    bad = []
    for name, fig in parity.items():
        if not isinstance(fig, dict):
            continue
        diff, tol = fig.get("max_abs_diff"), fig.get("tolerance")
        if _failed(fig):
            phrase = f"{name} differs by up to {diff:.3g} (tolerance {tol:g})"
            top1, floor = fig.get("top1_agreement"), fig.get("min_top1_agreement")
            if top1 is not None and floor is not None:
                phrase += f", top-1 agreement {top1:.0%} (at least {floor:.0%})"
            bad.append(phrase)
    return bad


_COUNTS = (("greedy_agreement", "greedy agreement"), ("identical", "identical"),
           ("analyzer_agrees", "analyzer agrees"))


def parity_line(name: str, fig) -> str:
    """One check of an export's parity figures as a person reads it: what was checked, the measured difference
    against its tolerance, passed or FAILED (judged as the gate judges), and on what inputs."""
    if not isinstance(fig, dict):
        return f"{name}: {fig}"
    diff, tol = fig.get("max_abs_diff"), fig.get("tolerance")
    what = "relative error" if "relative_error" in fig else "max difference"
    parts = [f"{name}: {'FAILED' if _failed(fig) else 'passed'}"]
    if diff is not None:
        span = [f"tolerance {tol:g}"] if tol is not None else []
        span += [fig["units"]] if fig.get("units") else []
        parts.append(f"{what} {diff:.3g}" + (f" ({'; '.join(span)})" if span else ""))
    top1, floor = fig.get("top1_agreement"), fig.get("min_top1_agreement")
    if top1 is not None:
        parts.append(f"top-1 agreement {top1:.0%}" + (f" (at least {floor:.0%})" if floor is not None else ""))
    parts += [f"{label} {fig[key]}" for key, label in _COUNTS if fig.get(key) is not None]
    line = ", ".join(parts)
    line += f"; against {fig.get('against', 'PyTorch')}"
    return line + (f", on {fig['inputs']}" if fig.get("inputs") else "")


class Gate:
    """The parity gate, run once per export by the host. An exporter may call it early (``options["gate"]``) to
    stop before slow work such as quantizing, and again for the quantized graphs' own figures; each named figure is
    judged once (the host does not judge it again, so a --force warning prints once)."""

    def __init__(self, entry, force: bool, say: Callable):
        self.entry, self.force, self.say = entry, force, say
        self.judged: dict = {}  # name -> a copy of the figures already judged

    def __call__(self, parity: dict) -> None:
        import copy

        fresh = {k: v for k, v in parity.items() if k not in self.judged or self.judged[k] != v}
        self.judged.update(copy.deepcopy(fresh))
        bad = parity_failures(fresh)
        if not bad:
            return
        if self.force:
            self.say(f"warning: the parity gate failed ({'; '.join(bad)}); keeping the export because of --force")
            return
        raise ParityError(f"The ONNX export of {self.entry.name} does not match PyTorch: {'; '.join(bad)}; "
                          "nothing was written (pass --force to keep it anyway).", bad)


def _not_exported(folder: Path) -> list:
    """The files in an earlier export's ``folder`` that its manifest does not list (a user's notes, results)."""
    from engine.backends.optimized import FOLDER as CACHE

    written = set(read_manifest(folder).get("files") or {}) | {MANIFEST}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in written
                  and CACHE not in p.relative_to(folder).parts)  # onnxruntime's optimized graphs: the studio's cache


def export_model(host, entry, out_dir: Optional[Path] = None, quantize: Optional[str] = None, force: bool = False,
                 log: Optional[Callable] = None) -> dict:
    """Export ``entry`` (a ModelEntry) and return its manifest (``manifest["folder"]`` is where it went)."""
    say = log or (lambda msg: None)
    if quantize not in QUANTIZE:
        raise UsageError(f"Quantization must be int8, int4 or none, not {quantize!r}.")
    host.load()
    if entry.family not in host.exporters:
        known = ", ".join(sorted(host.exporters)) or "none"
        raise UsageError(f"No ONNX exporter is registered for the {entry.family} family of model {entry.name} "
                         f"(exporters exist for: {known}).")
    export_fn, plugin = host.exporters[entry.family]
    dest = Path(out_dir).expanduser() if out_dir else default_out_dir(entry, quantize)
    dest = dest.absolute()
    if dest.exists() or dest.is_symlink():
        if dest.is_symlink() or not dest.is_dir() or not is_export(dest):
            raise UsageError(f"{dest} already exists and is not an earlier ONNX export; choose another --out folder.")
        made_from = read_manifest(dest).get("model") or {}
        if made_from.get("name") not in (None, entry.name) and made_from.get("hash") != entry.hash:
            raise UsageError(f"{dest} holds the ONNX export of model {made_from['name']}, which a new export would "
                             f"replace; choose another --out folder.")
        foreign = _not_exported(dest)
        if foreign:
            raise UsageError(f"{dest} holds files the earlier export did not write ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); a new export replaces the whole folder, so "
                             "move them out first or choose another --out folder.")
        say(f"replacing the earlier export in {dest}")
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]  # removed again on failure
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_scratch(dest.parent, f".{dest.name}.partial-")
        tmp = scratch_folder(dest.parent, f".{dest.name}.partial-")
    except OSError as exc:
        raise UsageError(f"Cannot write to {dest.parent} ({exc.strerror}); choose another --out folder.") from None
    try:
        options = {"quantize": quantize, "log": say, "gate": Gate(entry, force, say)}
        result = export_fn(entry.ref(), tmp, options)
        if not isinstance(result, dict) or not isinstance(result.get("graphs"), dict) or not result["graphs"]:
            raise ModelError(f"The ONNX exporter of plugin {plugin} returned no graphs for {entry.name}.")
        parity = result.get("parity") or {}
        if not parity:
            raise ModelError(f"The ONNX exporter of plugin {plugin} measured no parity figures; export refused.")
        failures = parity_failures(parity)
        options["gate"](parity)
        from engine.backends.common import externalize

        for graph in result["graphs"].values():
            if not (tmp / graph["file"]).is_file():
                raise ModelError(f"The ONNX exporter of plugin {plugin} did not write {graph['file']}.")
            externalize(tmp / graph["file"])
            frozen = [i["name"] for i in graph.get("inputs", []) if i.get("shape") and isinstance(i["shape"][0], int)]
            if frozen:
                raise ModelError(f"The exported graph {graph['file']} has a fixed batch size for input {frozen[0]}; "
                                 "the exporter froze an axis that must stay dynamic.")
        files = {p.relative_to(tmp).as_posix(): stamp(p) for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.relative_to(tmp).as_posix() != MANIFEST}  # Optimum's layout has subfolders
        from engine.backends.common import versions

        quant = None
        if quantize:
            from engine.backends.common import QUANTIZATIONS

            if not result.get("quantization"):
                raise ModelError(f"The ONNX exporter of plugin {plugin} does not quantize the {entry.family} family "
                                 f"to {quantize}; export it without --quantize or with another scheme.")
            gated = sorted(k for k in parity if k.endswith(f"_{quantize}"))
            quant = {**QUANTIZATIONS[quantize],
                     "gate": (f"the {quantize} graph passed its own gate against fp32 (parity: {', '.join(gated)})"
                              if gated else "the parity gate ran on the fp32 graph before quantization; the "
                              f"{quantize} graph of this family has no gate of its own")}
            quant.update(result.get("quantization") or {})
        manifest = {
            "format": FORMAT,
            "model": {"name": entry.name, "family": entry.family, "generator": entry.generator, "hash": entry.hash,
                      "builtin": entry.builtin},
            "folder": str(dest),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "exporter": plugin,
            "opset": result.get("opset"),
            "versions": versions(),
            "graphs": result["graphs"],
            "files": files,
            "parity": parity,
            "parity_passed": not failures,
            "forced": bool(failures and force),
            "quantization": quant,
            "config": result.get("config", {}),
        }
        import json

        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        say(f"wrote {len(files)} file(s) and {MANIFEST} to {dest}")
        manifest["used_by_backend"] = dest in [p.absolute() for p in export_folders(Path(entry.path))]
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first; only folders this export created and left empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
