"""Render the documentation screenshots: ``python -m studio.gui.screenshots docs/img``; the fine-tune page (a real
LoRA run, a minute or two on a CPU): ``python -m studio.gui.screenshots --finetune docs/screenshots/finetune_page.png``.

Uses a temporary STUDIO_HOME with the example plugin (and, for the plugin manager picture, a deliberately broken
drop-in plugin). Built-in generators run when they have a model; when the
built-in image generator has none, a demo plugin (``demo_shapes``: the shapes world drawn exactly, with fake
denoising previews) stands in, and its screenshot says so in its title.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEMO_SHAPES = '''
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Option, Partial, Progress, Result

INFO = GeneratorInfo(id="demo_shapes", title="Shapes (demo)", description="Draws a shapes-world caption exactly, "
                     "with fake denoising previews (a stand-in for screenshots).", takes=("text",), makes="image",
                     options=(Option("steps", "int", 12, "Preview steps", min=1, max=100),
                              Option("size", "int", 32, "Side in pixels", choices=(16, 32, 64))))

def generate(request, context):
    import time
    import numpy as np
    from PIL import Image
    from engine.errors import UsageError
    from engine.shapes import parse_caption, render
    try:
        scene = parse_caption(request.prompt or "")
    except ValueError:
        raise UsageError("Write a shapes-world caption, e.g. 'a large red circle in the center on a blue background'.")
    target = render(scene, request.options["size"], antialias=True).astype("float32")
    noise = np.random.default_rng(request.seed).normal(128, 80, target.shape)
    n = request.options["steps"]
    for i in range(n):
        context.cancel.raise_if_cancelled()
        t = (i + 1) / n
        time.sleep(0.02)
        yield Progress(i + 1, n, "denoising")
        yield Partial(image=Image.fromarray(np.clip(t * target + (1 - t) * noise, 0, 255).astype("uint8")))
    yield Result(image=Image.fromarray(target.astype("uint8")))

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''

BROKEN = '''"""A deliberately broken drop-in plugin, for the plugin manager screenshot."""
import studio_plugin_dependency_that_is_not_installed
'''

PROMPTS = {"text": "ROMEO:\n", "image": "a large red circle in the center on a blue background",
           "demo_shapes": "a large red circle in the center on a blue background",
           "echo": "to be or not to be", "tone": "hello studio"}


def _wait(app, window, timeout=300):
    end = time.monotonic() + timeout
    while window.task is not None and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.005)
    for _ in range(10):
        app.processEvents()


CHAT = ("A street in Verona, at night.", ("Who goes there?", "Speak, I pray thee: what news from Mantua?"))


def chat_turns(app, window) -> None:
    """A short conversation in the chat view (the built-in model), its second answer streamed in full."""
    window.chat.clear()
    window.chat.system.setPlainText(CHAT[0])
    for line in CHAT[1]:
        window.chat.input.setPlainText(line)
        window.generate()
        _wait(app, window)
    window.chat.input.setPlainText("And what of Romeo?")
    window.chat.update_meter()


def finetune_page(app, window, home: Path, png: Path, steps: int = 160, shoot_at: int = 120,
                  kind: str = "image") -> Path:
    """The fine-tune page part-way through a real run: the star LoRA of the shapes model (``kind`` "caption": of
    the shapes captioner) on 32 star scenes, the loss plotted, the samples of the last evaluation shown; the run is
    paused once the picture is taken."""
    import numpy as np
    from PIL import Image

    from engine import shapes as S

    data = home / "stars"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(32):
        base = S.sample_scene(rng)
        scene = S.Scene(base.size, base.colour, "star", base.position, base.background)
        Image.fromarray(S.render(scene, 32, antialias=i % 2 == 1)).save(data / f"star{i:02d}.png")
        (data / f"star{i:02d}.txt").write_text(S.caption(scene))
    window.open_finetune()
    page = window.finetune_page
    page.finetuner.setCurrentIndex(page.finetuner.findData(kind))
    page.set_dataset(str(data))
    page.form.set_values({"steps": steps, "batch": 8, "eval_every": 20, "checkpoint_every": 40, "lr": 3e-3}
                         if kind == "image" else {"steps": steps, "eval_every": 20, "checkpoint_every": 40})
    page.start()
    end = time.monotonic() + 900
    while page.busy() and (len(page.points["train"][0]) < shoot_at or page.points["train"][0][-1] % 20 > 3) \
            and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)
    from studio.gui.app import grab_to

    page.resize(1180, 780)
    path = grab_to(page, png)
    page.stop()
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only_finetune = argv[:1] in (["--finetune"], ["--finetune-caption"])  # `--finetune PNG`: just that page
    kind = "caption" if argv[:1] == ["--finetune-caption"] else "image"
    argv = argv[1:] if only_finetune else argv
    out = Path(argv[0] if argv else "docs/img")
    if not only_finetune:
        out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    home = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    os.environ["STUDIO_HOME"] = str(home)
    root = Path(__file__).resolve().parents[2]
    (home / "plugins").mkdir()
    shutil.copytree(root / "examples" / "studio-hello" / "studio_hello", home / "plugins" / "studio_hello")

    from studio.gui.app import application, grab_to
    from studio.gui.main_window import MainWindow
    from studio.gui.session import Session

    session = Session()
    if "image" not in session.host.generators or session.store.default_for("image") is None:
        (home / "plugins" / "demo_shapes.py").write_text(DEMO_SHAPES)
        session = Session()
    app = application()
    window = MainWindow(session)
    window.resize(1280, 800)
    window.show()
    if only_finetune:
        window.persist = False
        print(finetune_page(app, window, home, out if argv else Path("docs/screenshots/finetune_page.png"),
                            kind=kind))
        window.close()
        shutil.rmtree(home, ignore_errors=True)
        return 0
    written = []
    sample = home / "sample.png"
    from PIL import Image

    from engine.shapes import Scene, render
    Image.fromarray(render(Scene("large", "red", "circle", "centre", "blue"), 32, antialias=True)).save(sample)
    last_image = None
    for gid in window.generator_ids():
        info = session.host.generators[gid][0].info
        if info.families and not session.models_for(info):
            print(f"skip {gid}: no model installed", file=sys.stderr)
            continue
        window.select_generator(gid)
        if "text" in info.takes:
            window.panel.prompt.setPlainText(PROMPTS.get(gid, "a prompt"))
        if "image" in info.takes:
            window.panel.image_input.set_path(str(last_image or sample))
        window.panel.seed.setText("7")
        if "messages" in info.takes:
            chat_turns(app, window)
        else:
            window.generate()
            _wait(app, window)
        if info.makes == "image" and window.output.image_file():
            last_image = window.output.image_file()
        written.append(grab_to(window, out / f"main-{gid}.png"))
    window.tabs.setCurrentWidget(window.history)
    window.history.select_row(0)
    written.append(grab_to(window, out / "history.png"))

    from studio.gui.plugin_dialog import PluginDialog
    (home / "plugins" / "broken_example.py").write_text(BROKEN)  # to show how a failed plugin looks
    window.reload_plugins()
    dlg = PluginDialog(session, window)
    dlg.show()
    failed = [i for i, p in enumerate(dlg.model.rows) if p.status == "failed"]
    dlg.table.selectRow(failed[0] if failed else 0)
    written.append(grab_to(dlg, out / "plugins.png"))
    dlg.close()

    from studio.gui.export_dialog import ExportDialog
    dlg = ExportDialog(session, window)
    dlg.show()
    if dlg.model.count():
        dlg.start()
        end = time.monotonic() + 300
        while dlg.task is not None and time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)
    written.append(grab_to(dlg, out / "export.png"))
    dlg.close()

    from studio.gui.model_dialog import ModelDialog
    dlg = ModelDialog(session, window)
    dlg.show()
    written.append(grab_to(dlg, out / "models.png"))
    dlg.close()

    from studio.gui.about_dialog import AboutDialog
    dlg = AboutDialog(window)
    dlg.show()
    dlg.task.wait(60000)
    written.append(grab_to(dlg, out / "about.png"))
    dlg.close()
    window.close()
    for path in written:
        print(path)
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
