"""The GUI's handle on the engine: plugin host, model store, history and settings (plain Python, no Qt)."""
from __future__ import annotations

import copy
import logging
from typing import Optional

from engine import state
from engine.history import History
from engine.plugins import PluginHost
from engine.store import ModelStore

log = logging.getLogger(__name__)


class Session:
    """Everything the windows share. ``reload_plugins`` builds a fresh PluginHost (after install/enable)."""

    def __init__(self, host: Optional[PluginHost] = None, host_factory=None, host_kwargs: Optional[dict] = None,
                 isolate: Optional[bool] = None):
        """``host_kwargs``: PluginHost arguments (JSON-ready). Generations run in a child process
        (``engine.child``) when the host is described that way, unless ``isolate`` is False or
        ``STUDIO_GUI_ISOLATE=0``; a ready-made ``host`` or ``host_factory`` means in-process generations."""
        self.host_kwargs = dict(host_kwargs or {})
        self._host_factory = host_factory or (lambda: PluginHost(**self.host_kwargs))
        self.host = (host or self._host_factory()).load()
        self.store = ModelStore(self.host)
        self.history = History()
        self.settings = state.load_settings()
        self.loaded = copy.deepcopy(self.settings)  # what the file held: a save writes only what changed since
        self.cache: dict = {}  # loaded models, shared between in-process generations (Context.cache)
        if isolate is None:
            isolate = host is None and host_factory is None and state.env_flag("STUDIO_GUI_ISOLATE", True)
        self.process = None
        if isolate:
            from engine.child import GenerationProcess

            self.process = GenerationProcess(self.host_kwargs)

    def check_new_plugins(self) -> None:
        """Run the throwaway-process check of new plugins now (from a worker thread: it can take a while), so
        that ``reload_plugins`` on the window's thread finds their verdicts remembered."""
        from engine import plugin_check

        plugin_check.failures(self._host_factory().to_check())

    def plugins_need_check(self) -> bool:
        """Whether a reload would first check a new or changed plugin in a throwaway process."""
        from engine import plugin_check

        return plugin_check.needed(self._host_factory().to_check())

    def reload_plugins(self) -> PluginHost:
        self.host = self._host_factory().load()
        self.store = ModelStore(self.host)
        self.cache = {}
        if self.process is not None:
            self.process.stop()  # the next generation starts a child with the new plugins
        return self.host

    def close(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=0.5, close=True)

    def generators(self) -> list:
        """GeneratorInfo of every registered generator, in registration order."""
        return [g.info for g, _ in self.host.generators.values()]

    def models_for(self, info) -> list:
        if not info.families:
            return []
        return [e for e in self.store.list() if e.family in info.families]

    def find_generator(self, makes: str, takes: str) -> Optional[str]:
        """The built-in id when present (``image``/``caption``), else the first generator that fits."""
        preferred = {("image", "text"): "image", ("text", "image"): "caption"}.get((makes, takes))
        if preferred and preferred in self.host.generators:
            return preferred
        for info in self.generators():
            if info.makes == makes and takes in info.takes:
                return info.id
        return None

    def save_settings(self, quiet: bool = True) -> None:
        """Write the settings; when they cannot be written, a warning in the log (``quiet``, as the window
        closes), else the StateError, for the window to show (the Settings dialog's OK said nothing)."""
        try:
            written = state.save_changes(self.settings, self.loaded)
            self.loaded = copy.deepcopy(written)
        except Exception as exc:  # noqa: BLE001 - settings are a convenience; never fatal
            if not quiet:
                raise
            log.warning("Could not save settings: %s", exc)
