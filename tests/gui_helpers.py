"""Fixtures and test plugins for the GUI tests (pytest-qt, offscreen)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from plugin_samples import SLOW, generator_plugin

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "studio-hello" / "studio_hello"

PREVIEW = generator_plugin('''

INFO = GeneratorInfo(id="preview", title="Preview", description="Denoises a gradient, with previews.",
                     takes=("text",), makes="image",
                     options=(Option("steps", "int", 4, "Steps", min=1, max=50),
                              Option("guidance", "float", 3.0, "Guidance", min=0.0, max=10.0),
                              Option("sampler", "str", "ddim", "Sampler", choices=("ddim", "euler")),
                              Option("negative_prompt", "str", "", "What to avoid")))

def generate(request, context):
    import time
    from PIL import Image
    n = request.options["steps"]
    for i in range(n):
        context.cancel.raise_if_cancelled()
        time.sleep(0.03)
        yield Progress(i + 1, n, "denoising")
        yield Partial(image=Image.new("RGB", (8, 8), (30 * i % 256, 0, 0)))
    yield Result(image=Image.new("RGB", (8, 8), ((request.seed * 7) % 256, 100, 200)))

''')

CAPTIONER = generator_plugin('''

INFO = GeneratorInfo(id="describe", title="Describe", description="Says the size of an image.",
                     takes=("image",), makes="text")

def generate(request, context):
    from PIL import Image
    with Image.open(request.image) as im:
        text = f"an image of {im.width} by {im.height} pixels"
    for i, word in enumerate(text.split()):
        yield Progress(i + 1, len(text.split()))
        yield Partial(text=(" " if i else "") + word)
    yield Result(text=text, token_ids=[])

''')


def install_plugins(home: Path, hello: bool = True, **sources) -> None:
    """Drop the example plugin and named test plugins into ``home/plugins``."""
    folder = home / "plugins"
    folder.mkdir(exist_ok=True)
    if hello and not (folder / "studio_hello").exists():
        shutil.copytree(EXAMPLE, folder / "studio_hello")
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(source)


def make_window(qtbot, generator=None, isolate=True):
    """A main window over a plugin host without the built-ins (fast, deterministic); ``isolate=False`` runs
    generations and exports in the test's own process (for tests that fake engine functions)."""
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    session = Session(host_kwargs={"builtins": []}, isolate=isolate)  # a child process, as in `studio gui`
    window = MainWindow(session, generator=generator)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    window.activateWindow()
    qtbot.waitUntil(lambda: window.isActiveWindow(), timeout=2000)
    return window


def wait_idle(qtbot, window, timeout=5000) -> None:
    qtbot.waitUntil(lambda: window.task is None and not getattr(window, "preparing", None), timeout=timeout)


@pytest.fixture
def gui_home(studio_home):
    install_plugins(studio_home, preview=PREVIEW, slow=SLOW, describe=CAPTIONER)
    return studio_home


def as_user_models(source: Path, home: Path) -> Path:
    """The model folders under ``source``, copied in as the user models of the state folder ``home``."""
    shutil.copytree(source, home / "models")
    return home / "models"
