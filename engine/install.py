"""Installing and removing plugins: pip for the running interpreter, with the studio's core packages pinned."""
from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import state
from engine.errors import PluginError, UsageError

WARNING = ("A plugin is code that runs with your user rights and can read or change your files; "
           "install only plugins you trust.")
CORE = ("genai-studio", "torch", "PySide6-Essentials", "onnxruntime", "onnx", "pluggy", "Pillow", "soundfile",
        "numpy", "safetensors", "tokenizers", "platformdirs")


def constraints_text() -> str:
    """Pins for every core package that is installed, so a plugin cannot upgrade or replace them."""
    lines = []
    for name in CORE:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def _pip(args: list) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip()]
        raise PluginError(f"pip failed: {last[-1] if last else 'exit status %d' % proc.returncode}")


def install(source: str) -> None:
    """Install a plugin from a folder with a pyproject.toml, a wheel file, or a package name."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not ((path / "pyproject.toml").exists() or (path / "setup.py").exists()):
            raise UsageError(f"{source} is a folder without a pyproject.toml; point at a plugin package folder.")
        if path.is_file() and path.suffix != ".whl":
            raise UsageError(f"{source} is not a wheel (.whl); give a wheel, a package folder or a package name.")
        target = str(path.resolve())
    elif "/" in source or source.endswith(".whl"):
        raise UsageError(f"{source} does not exist.")
    else:
        target = source
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(constraints_text())
        constraints = f.name
    try:
        _pip(["install", "--disable-pip-version-check", "-q", "-c", constraints, target])
    finally:
        Path(constraints).unlink(missing_ok=True)
    importlib.invalidate_caches()


def uninstall(host, name: str) -> None:
    status = host.plugins.get(name)
    if status is None:
        raise UsageError(f"There is no plugin called {name!r}; see `studio plugins list`.")
    if status.source == "built-in":
        raise UsageError(f"{name} is built in; disable it instead with `studio plugins disable {name}`.")
    if status.source == "drop-in":
        path = Path(status.location)
        if path.parent.resolve() != (state.home() / "plugins").resolve():
            raise UsageError(f"{path} is not in the drop-in folder; nothing was removed.")
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()  # a link: only the link
        return
    dist = None
    for ep in importlib.metadata.entry_points(group="studio.plugins"):
        if ep.name == name and getattr(ep, "dist", None) is not None:
            dist = ep.dist.name
    if dist is None:
        raise PluginError(f"Cannot tell which package provides plugin {name}; uninstall it with pip.")
    _pip(["uninstall", "--disable-pip-version-check", "-y", "-q", dist])
    importlib.invalidate_caches()
