import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLUGIN = ROOT / "examples" / "studio-hello"


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own empty state folder and normal (not safe) mode."""
    home = tmp_path / "studio-home"
    home.mkdir()
    monkeypatch.setenv("STUDIO_HOME", str(home))
    monkeypatch.delenv("STUDIO_SAFE_MODE", raising=False)
    return home


@pytest.fixture
def hello_plugin(studio_home):
    """The example plugin, dropped into the state folder's plugin folder (no pip needed)."""
    import shutil

    dest = studio_home / "plugins" / "studio_hello"
    shutil.copytree(EXAMPLE_PLUGIN / "studio_hello", dest)
    return dest


@pytest.fixture(scope="module")
def exported_tiny(request, tmp_path_factory):
    """A tiny random text model exported to ONNX, once per test module; its family is the module's
    ``EXPORT_FAMILY`` (llama when not set)."""
    from tests.onnx_fixtures import exported_text

    family = getattr(request.module, "EXPORT_FAMILY", "llama")
    return exported_text(tmp_path_factory.mktemp(f"exported-{family}"), family)


@pytest.fixture
def copy(exported_tiny, tmp_path):
    """A fresh copy of ``exported_tiny`` for a test to change or damage."""
    from tests.onnx_fixtures import copy_of

    return copy_of(exported_tiny, tmp_path / "tiny")
