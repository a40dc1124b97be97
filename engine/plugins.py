"""The plugin host: finds, loads and guards plugins, and records what each one registered.

Built-ins (``DEFAULT_PLUGINS``), entry points (group ``studio.plugins``) and
drop-in files or packages under ``$STUDIO_HOME/plugins/`` are all loaded by the
same code. Loading is lazy (``load()`` at first use), idempotent and guarded:
a plugin that fails to import, raises in a hook or registers something invalid
is marked failed, its registrations are dropped, and every other plugin keeps
working.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pluggy

import engine
from engine import hookspecs, state
from engine.architectures import Architecture, Importer
from engine.errors import UsageError
from engine.generators import Generator, GeneratorInfo, Option, Trainer

log = logging.getLogger(__name__)

DEFAULT_PLUGINS = ("plugins.text", "plugins.image", "plugins.caption", "plugins.stable_diffusion")
ENTRY_POINT_GROUP = "studio.plugins"
HOOKS = ("register_generators", "register_architectures", "register_exporters", "register_trainers",
         "register_finetuners", "register_importers")


@dataclass
class PluginStatus:
    name: str
    source: str  # "built-in" | "entry point" | "drop-in"
    version: str = ""
    status: str = "loaded"  # "loaded" | "disabled" | "failed"
    error: str = ""
    details: str = ""  # traceback, for "details on demand"
    location: str = ""
    generators: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "source": self.source, "status": self.status,
            "error": self.error, "location": self.location, "generators": list(self.generators),
        }


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str
    version: str
    location: str
    load: Callable[[], Any]  # returns the plugin object (usually a module)
    stamp_path: str = ""  # a file or folder whose modification time changes with the plugin's code


@contextlib.contextmanager
def plugin_output():
    """What plugin code writes to stdout (print, or os.write on fd 1 from native code) goes to stderr while it
    runs: stdout carries the studio's own output (``--json``, a streamed answer)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no stdout at all (pythonw): nothing to keep clean
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        sys.stderr.flush()
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


class PluginHost:
    def __init__(self, safe_mode: Optional[bool] = None, disabled: Optional[list] = None, builtins=DEFAULT_PLUGINS):
        self.safe_mode = state.safe_mode() if safe_mode is None else safe_mode
        self._disabled = disabled
        self.builtins = tuple(builtins)
        self.plugins: dict[str, PluginStatus] = {}
        self.generators: dict[str, tuple[Generator, str]] = {}
        self.architectures: dict[str, tuple[Architecture, str]] = {}
        self.exporters: dict[str, tuple[Callable, str]] = {}
        self.trainers: dict[str, tuple[Trainer, str]] = {}
        self.finetuners: dict[str, tuple[Trainer, str]] = {}
        self.importers: dict[str, tuple[Importer, str]] = {}
        self._loaded = False

    # ----- discovery -------------------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        found = [
            Candidate(mod.rsplit(".", 1)[-1], "built-in", engine.__version__, mod,
                      (lambda m=mod: importlib.import_module(m)))
            for mod in self.builtins
        ]
        if self.safe_mode:
            return found
        try:
            eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken distribution's metadata must not stop the studio
            log.warning("Cannot read plugin entry points: %s", exc)
            eps = []
        for ep in eps:
            version = getattr(getattr(ep, "dist", None), "version", "") or ""
            meta = getattr(getattr(ep, "dist", None), "_path", "") or ""  # the .dist-info folder
            found.append(Candidate(ep.name, "entry point", version, ep.value, ep.load, str(meta)))
        folder = state.home() / "plugins"
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.name.startswith((".", "_")):
                    continue
                if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
                    found.append(Candidate(path.stem, "drop-in", "", str(path), (lambda p=path: _import_path(p)),
                                           str(path)))
        return found

    def to_check(self, candidates: Optional[list] = None, disabled: Optional[set] = None) -> list:
        """The candidates ``load`` would import (all but the disabled): what engine/plugin_check.py checks."""
        disabled = self.disabled() if disabled is None else disabled
        return [c for c in (self.candidates() if candidates is None else candidates) if c.name not in disabled]

    def disabled(self) -> set:
        """The plugins the settings disable; none in safe mode, which loads every built-in (so that a user who
        disabled them all still gets a working studio to recover with)."""
        if self._disabled is not None:
            return set(self._disabled)
        if self.safe_mode:
            return set()
        return set(state.load_settings().disabled_plugins)

    # ----- loading ---------------------------------------------------------------------------
    def load(self) -> "PluginHost":
        """Load every plugin once. Safe to call again: later calls do nothing."""
        if self._loaded:
            return self
        self._loaded = True
        from engine import plugin_check

        disabled = self.disabled()
        candidates = self.candidates()
        # a plugin that would kill or hang this process is found in a throwaway one first (engine/plugin_check.py)
        crashed = plugin_check.failures(self.to_check(candidates, disabled))
        for cand in candidates:
            if cand.name in self.plugins:
                self.plugins[f"{cand.name} ({cand.source})"] = PluginStatus(
                    cand.name, cand.source, cand.version, "failed",
                    f"Another plugin is already called {cand.name!r}; rename one of them.", location=cand.location)
                continue
            status = PluginStatus(cand.name, cand.source, cand.version, location=cand.location)
            self.plugins[cand.name] = status
            if cand.name in disabled:
                status.status = "disabled"
                continue
            if plugin_check.key(cand) in crashed:
                self._fail(status, crashed[plugin_check.key(cand)][0])
                status.details = crashed[plugin_check.key(cand)][1]
                continue
            with plugin_output():  # a plugin that prints must not corrupt --json output
                self._load_one(cand, status)
        return self

    def _fail(self, status: PluginStatus, message: str, exc: BaseException | None = None) -> None:
        status.status = "failed"
        status.error = message
        if exc is not None:
            status.details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.info("Plugin %s failed: %s", status.name, message)

    def _load_one(self, cand: Candidate, status: PluginStatus) -> None:
        try:
            obj = cand.load()
        except BaseException as exc:  # noqa: BLE001 - a plugin must never take the host down
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(status, f"Plugin {cand.name} could not be imported: {type(exc).__name__}: {exc}", exc)
            return
        if not status.version:
            status.version = str(getattr(obj, "__version__", "") or "")
        pm = pluggy.PluginManager("studio")
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(obj, name=cand.name)
        except Exception as exc:
            self._fail(status, f"Plugin {cand.name} does not follow the plugin contract: {exc}", exc)
            return
        if not any(getattr(pm.hook, h).get_hookimpls() for h in HOOKS):
            self._fail(status, f"Plugin {cand.name} implements none of the studio hooks ({', '.join(HOOKS)}).")
            return
        staged = {"generators": {}, "architectures": {}, "exporters": {}, "trainers": {}, "finetuners": {},
                  "importers": {}}
        try:
            for hook in HOOKS:
                for impl in getattr(pm.hook, hook).get_hookimpls():
                    impl.function(self._registrar(hook, cand.name, staged))
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, _Invalid):
                self._fail(status, f"Plugin {cand.name} registered something invalid: {exc}")
            else:
                self._fail(status, f"Plugin {cand.name} raised in a hook: {type(exc).__name__}: {exc}", exc)
            return
        self.generators.update(staged["generators"])
        self.architectures.update(staged["architectures"])
        self.exporters.update(staged["exporters"])
        self.trainers.update(staged["trainers"])
        self.finetuners.update(staged["finetuners"])
        self.importers.update(staged["importers"])
        status.generators = sorted(staged["generators"])

    def _registrar(self, hook: str, plugin: str, staged: dict) -> Callable:
        what = hook.split("_", 1)[1]  # "generators", "architectures", "trainers", "finetuners", "importers"
        kinds = {"generators": (Generator, lambda g: g.info.id, "generator id"),
                 "architectures": (Architecture, lambda a: a.family, "model family"),
                 "trainers": (Trainer, lambda t: t.kind, "trainer"), "finetuners": (Trainer, lambda t: t.kind,
                                                                                     "finetuner"),
                 "importers": (Importer, lambda i: i.name, "importer")}
        if what in kinds:
            cls, key_of, noun = kinds[what]

            def register(obj):
                if not isinstance(obj, cls):
                    raise _Invalid(f"{hook} expects {cls.__module__}.{cls.__name__} objects")
                if what == "generators" and (not isinstance(obj.info, GeneratorInfo) or not callable(obj.generate)):
                    raise _Invalid(f"generator {getattr(obj.info, 'id', '?')!r} has no GeneratorInfo or no callable "
                                   "generate")
                if cls is Trainer and not callable(obj.run):
                    raise _Invalid(f"{hook} expects engine.generators.Trainer objects with a callable run")
                if cls is Trainer and not all(isinstance(o, Option) for o in obj.options):
                    raise _Invalid(f"{noun} {obj.kind!r}: options must be engine.generators.Option objects")
                key, known = key_of(obj), getattr(self, what)
                if key in known or key in staged[what]:
                    owner = known.get(key, (None, plugin))[1]
                    raise _Invalid(f"{noun} {key!r} is already registered by plugin {owner}")
                staged[what][key] = (obj, plugin)
            return register

        def register(family, export):  # register_exporters
            if not isinstance(family, str) or not callable(export):
                raise _Invalid("register_exporters expects (family: str, export: callable)")
            if family in self.exporters or family in staged["exporters"]:  # (it replaced the built-in silently)
                owner = self.exporters.get(family, staged["exporters"].get(family, (None, plugin)))[1]
                raise _Invalid(f"the exporter of model family {family!r} is already registered by plugin {owner}")
            staged["exporters"][family] = (export, plugin)
        return register

    # ----- queries ---------------------------------------------------------------------------
    def generator(self, gid: str) -> Generator:
        self.load()
        if gid not in self.generators:
            known = ", ".join(sorted(self.generators)) or "none"
            raise UsageError(f"Unknown generator {gid!r}; the installed generators are: {known}.")
        return self.generators[gid][0]

    def trainer(self, kind: str, finetune: bool = False) -> Trainer:
        self.load()
        found, what = (self.finetuners, "fine-tuning") if finetune else (self.trainers, "training")
        if kind not in found:
            known = ", ".join(sorted(found)) or "none"
            raise UsageError(f"Unknown {what} kind {kind!r}; the installed ones are: {known}.")
        return found[kind][0]

    def importer_for(self, path) -> Optional[Importer]:
        """The first registered importer whose ``detect`` recognises ``path`` (a broken one is skipped)."""
        self.load()
        for importer, plugin in self.importers.values():
            try:
                if importer.detect(path):
                    return importer
            except Exception as exc:  # noqa: BLE001 - a plugin's detect must not break importing
                log.warning("Importer %s of plugin %s failed on %s: %s", importer.name, plugin, path, exc)
        return None

    def plugin_of(self, gid: str) -> str:
        self.load()
        return self.generators[gid][1]

    def architecture_for(self, config: dict) -> Optional[Architecture]:
        self.load()
        for arch, plugin in self.architectures.values():
            try:
                if arch.matches(config):
                    return arch
            except Exception as exc:  # a plugin's matcher must not break recognition for others
                log.warning("Architecture %s (plugin %s) raised in matches(): %s", arch.family, plugin, exc)
        return None


class _Invalid(Exception):
    pass


def _import_path(path: Path):
    """Import a drop-in ``.py`` file or package folder under a private module name."""
    mod_name = f"studio_dropin_{path.stem}"
    init = path / "__init__.py" if path.is_dir() else path
    spec = importlib.util.spec_from_file_location(
        mod_name, init, submodule_search_locations=[str(path)] if path.is_dir() else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module


def set_enabled(name: str, enabled: bool) -> None:
    """Persist enable/disable in settings. Takes effect at the next load; enabling also forgets a failed load
    check, so the plugin is checked again."""
    if enabled:
        from engine import plugin_check

        plugin_check.forget_failure(name)
    def change(settings) -> None:
        names = [n for n in settings.disabled_plugins if n != name]
        settings.disabled_plugins = sorted(names + ([] if enabled else [name]))

    state.update_settings(change)
