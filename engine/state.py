"""The state folder: settings, history, user models, drop-in plugins and outputs.

``STUDIO_HOME`` when set, else the platform's user data folder.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Callable

from engine.errors import StateError, UsageError
from engine.generators import BACKENDS, DEVICES, FALSE_WORDS, TRUE_WORDS, digits

log = logging.getLogger(__name__)


BUILTIN_MODELS = Path(__file__).resolve().parent.parent / "resources" / "models"  # read-only, shipped


def home() -> Path:
    env = os.environ.get("STUDIO_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("genai-studio", appauthor=False))


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"Cannot create folder {path} ({exc.strerror}); set STUDIO_HOME to a writable folder.") from None
    return path


def safe_mode() -> bool:
    return env_flag("STUDIO_SAFE_MODE", False)


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off in any case; ``default`` when unset or
    empty, and (with one warning naming it) when it says something else."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in TRUE_WORDS or raw in FALSE_WORDS:
        return raw in TRUE_WORDS
    if raw:
        warn_once(f"{name}={raw!r} is not 1 or 0 (true/false, yes/no, on/off); using {int(default)}.")
    return default


def env_number(name: str, default: float) -> float:
    """A positive number from an environment variable; ``default`` when unset, and (with one warning) when not."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value > 0:
        return value
    warn_once(f"{name}={raw!r} is not a positive number; using {default}.")
    return default


@dataclass
class Settings:
    disabled_plugins: list = field(default_factory=list)
    device: str = "auto"
    backend: str = "auto"  # ONNX on the CPU when the model has a gated export, torch on a GPU (engine.runner)
    output_dir: str = ""  # empty: <home>/outputs
    gui: dict = field(default_factory=dict)  # window geometry, last-used options
    sd_model_checkpoint: str = ""  # the image model `studio serve`'s A1111 API uses (POST /sdapi/v1/options)

    @property
    def outputs(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else home() / "outputs"


def settings_path() -> Path:
    return home() / "settings.json"


SETTING_CHOICES = {"device": DEVICES, "backend": BACKENDS}
_warned: set = set()  # each problem of a settings file is told once per process, not at every read


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _setting_problem(name: str, value) -> str:
    """Why ``value`` cannot be setting ``name`` ("" when it can)."""
    default = getattr(Settings(), name)
    if name in SETTING_CHOICES and value not in SETTING_CHOICES[name]:
        return f"is {value!r}, not one of {', '.join(SETTING_CHOICES[name])}"
    if not isinstance(value, type(default)):
        return f"is {value!r}, not a {type(default).__name__}"
    if name == "disabled_plugins" and not all(isinstance(v, str) for v in value):
        return "holds something other than plugin names"
    return ""


def load_settings() -> Settings:
    """Read settings; a missing file gives defaults, a corrupt one (or a bad value in it) gives defaults for what is
    wrong and one warning that names settings.json."""
    path = settings_path()
    if not path.exists():
        return Settings()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (ValueError, TypeError, OSError, RecursionError) as exc:  # (JSON nested past Python's stack)
        warn_once(f"Settings file {path} is unreadable ({exc}); using defaults (fix or delete the file).")
        return Settings()
    known = {}
    for name, value in data.items():
        if name not in Settings.__dataclass_fields__:
            continue
        problem = _setting_problem(name, value)
        if problem:
            warn_once(f"In the settings file {path}, {name} {problem}; using {getattr(Settings(), name)!r} "
                       f"instead (fix or delete the file).")
        else:
            known[name] = value
    return Settings(**known)


@contextmanager
def settings_lock():
    """One process at a time reads, changes and writes settings.json (an advisory lock on a file beside it):
    eight `studio plugins disable` at once kept 3 to 5 of the 8 names."""
    import fcntl

    ensure_dir(home())
    with open(home() / "settings.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_settings(change: Callable[[Settings], None]) -> Settings:
    """Apply ``change`` to the settings as the file holds them now and write them, under the lock: what another
    process wrote meanwhile is kept. Returns the settings written."""
    with settings_lock():
        settings = load_settings()
        change(settings)
        save_settings(settings)
    return settings


def save_changes(settings: Settings, loaded: Settings) -> Settings:
    """Write only what of ``settings`` differs from ``loaded`` (what this process read at its start) into the file
    as it is now: a window closing keeps what the command line changed while it was open. A field that holds a
    dict (the window's ``gui``) is compared key by key, and so is a dict of dicts in it (``generators``: one form
    per generator); any other value (a conversation, one generator's form) is one value, written whole. So of two
    windows on one state folder, the one that closes last keeps what the other changed and it did not. Returns the
    settings written (the new ``loaded``)."""
    def change(now: Settings) -> None:
        for f in Settings.__dataclass_fields__:
            setattr(now, f, _changed(getattr(now, f), getattr(settings, f), getattr(loaded, f), top=True))

    return update_settings(change)


_NOTHING = object()  # (a key this process did not have)


def _changed(now, new, old, top: bool = False):
    """``now`` (the file's) with the changes from ``old`` to ``new`` (this process's) made in it."""
    if new == old:
        return now
    by_key = isinstance(new, dict) and isinstance(old, dict) and isinstance(now, dict) and \
        (top or all(isinstance(v, dict) for v in new.values()))
    if not by_key:
        return new
    merged = dict(now)
    for key in set(new) | set(old):
        if key not in new:
            merged.pop(key, None)
            continue
        was = old.get(key, {} if isinstance(new[key], dict) else _NOTHING)  # (a dict new here: changed from empty)
        if new[key] != was:
            merged[key] = _changed(now.get(key), new[key], was)
    return merged


def save_settings(settings: Settings) -> None:
    """Write ``settings``, keeping what the file holds that this version does not know (a newer version's settings);
    a file that cannot be read is first kept beside it, so a typo never costs the user their settings."""
    from engine.outputs import atomic_write_bytes

    ensure_dir(home())
    path, extra = settings_path(), {}
    try:
        old = path.read_bytes()
    except OSError:
        old = None
    if old is not None:
        try:
            earlier = json.loads(old.decode("utf-8"))
            if not isinstance(earlier, dict):
                raise ValueError("not an object")
            extra = {k: v for k, v in earlier.items() if k not in Settings.__dataclass_fields__}
        except (ValueError, RecursionError):  # (a UnicodeDecodeError is one)
            kept = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            atomic_write_bytes(kept, old)
            logging.getLogger(__name__).warning("The settings file %s could not be read; it is kept as %s and a new "
                                                "one is written.", path, kept)
    data = json.dumps({**extra, **asdict(settings)}, indent=2).encode()
    try:
        atomic_write_bytes(path, data)
    except StateError as exc:
        raise StateError(f"Cannot save the settings: {str(exc).rstrip('.')} (the state folder {home()}); make it "
                         "writable, or set STUDIO_HOME to a writable folder.") from None


def env_threads(name: str) -> int:
    """A thread count from the environment variable ``name`` (0 when unset), at most the machine's cores: a larger
    number only oversubscribes the CPU (and far larger ones crash native thread pools), so it is capped, with a
    warning. UsageError for anything but a positive whole number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    cores = os.cpu_count() or 1
    if not digits(raw) or int(raw) < 1:
        raise UsageError(f"{name} must be a whole number of threads from 1 to {cores}, not {raw!r}.")
    if int(raw) > cores:
        logging.getLogger(__name__).warning("%s=%s is more than this machine's %d cores; using %d.", name, raw,
                                            cores, cores)
        return cores
    return int(raw)
