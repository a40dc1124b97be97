"""Inpainting masks (issue #14 item 4): a generator that takes "mask" gets request.mask beside an optional image;
the mask is checked, kept in the recipe by content and used again by a replay; the window paints it with a brush."""
import pytest
from PIL import Image

from engine.errors import UsageError
from engine.plugins import PluginHost
from engine.replay import replay
from engine.runner import Job, execute, prepare
from engine.store import ModelStore
from plugin_samples import drop, generator_plugin

INPAINT = generator_plugin('''
INFO = GeneratorInfo(id="inpaint", title="Inpaint", description="Paints the masked part red.",
                     takes=("text", "image", "mask"), makes="image", image_required=False, prompt_required=False)

def generate(request, context):
    from PIL import Image
    if request.image is None:
        yield Result(image=Image.new("RGB", (8, 8), (0, 0, 255)))
        return
    image = Image.open(request.image).convert("RGB")
    if request.mask is not None:
        mask = Image.open(request.mask).convert("L").resize(image.size)
        image.paste(Image.new("RGB", image.size, (255, 0, 0)), (0, 0), mask)
    yield Result(image=image)
''')


@pytest.fixture
def studio(studio_home, tmp_path):
    drop(studio_home, "inpaint", INPAINT)
    host = PluginHost(builtins=()).load()
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(image)
    m = Image.new("L", (8, 8), 0)
    m.paste(255, (0, 0, 4, 8))  # the left half
    m.save(mask)
    return host, ModelStore(host), image, mask


def test_mask_reaches_the_generator_and_the_recipe_and_replays(studio):
    host, store, image, mask = studio
    record = execute(prepare(host, store, Job("inpaint", image=str(image), mask=str(mask), seed=1)))
    out = record.result.image
    assert out.getpixel((1, 1)) == (255, 0, 0) and out.getpixel((6, 6)) == (0, 255, 0)
    assert record.recipe["mask"]["sha256"] and record.recipe["image"]["sha256"]
    Image.new("L", (8, 8), 0).save(mask)  # the user's mask file changes after the generation
    again, same, notes = replay(host, store, record.recipe)
    assert same and any("copy the studio kept" in n for n in notes)


def test_image_optional_and_bad_masks_refused(studio, tmp_path):
    host, store, image, mask = studio
    record = execute(prepare(host, store, Job("inpaint", prompt="a cat", seed=1)))  # no image: text to image
    assert record.result.image.getpixel((0, 0)) == (0, 0, 255) and "mask" not in record.recipe
    with pytest.raises(UsageError, match="pass --image PATH with --mask"):
        prepare(host, store, Job("inpaint", mask=str(mask)))
    with pytest.raises(UsageError, match="Mask .* does not exist"):
        prepare(host, store, Job("inpaint", image=str(image), mask=str(tmp_path / "missing.png")))


def test_generators_without_mask_refuse_one(studio_home, tmp_path):
    from plugin_samples import PIXELS

    drop(studio_home, "pixels", PIXELS)
    host = PluginHost(builtins=()).load()
    mask = tmp_path / "m.png"
    Image.new("L", (4, 4)).save(mask)
    with pytest.raises(UsageError, match="takes no mask"):
        prepare(host, ModelStore(host), Job("pixels", prompt="x", image=None, mask=str(mask)))


def test_window_paints_a_mask_for_generators_that_take_one(qtbot, studio_home, tmp_path):
    from PySide6.QtCore import Qt

    from gui_helpers import install_plugins, make_window

    install_plugins(studio_home, inpaint=INPAINT)
    w = make_window(qtbot, generator="inpaint", isolate=False)
    panel = w.panel
    assert panel.image_input.mask_row.isVisibleTo(panel) and "optional" in panel.image_label.text()
    assert panel.job().image is None  # the image is optional for this generator
    src = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (0, 255, 0)).save(src)
    panel.image_input.set_path(src)
    assert panel.job().mask is None  # nothing painted yet
    panel.image_input.paint_button.setChecked(True)
    canvas = panel.image_input.canvas
    rect = canvas.target_rect()
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=rect.center())
    job = panel.job()
    assert job.mask and Image.open(job.mask).getpixel((8, 8)) == 255 and Image.open(job.mask).getpixel((0, 0)) == 0


def test_load_mask_reads_masks_as_the_studio_reads_images(tmp_path):
    """engine.images.load_mask: a mask with real transparency is its alpha (strokes painted on a transparent
    layer repaint), as AUTOMATIC1111 reads one; an opaque one is its grey level; EXIF orientation is applied as
    for the image it goes with; a broken file is one sentence."""
    import io

    import numpy as np

    from engine.images import load_image, load_mask

    strokes = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    strokes.paste((255, 255, 255, 255), (0, 0, 3, 6))
    strokes.save(tmp_path / "strokes.png")
    got = np.asarray(load_mask(tmp_path / "strokes.png"))
    assert got.shape == (6, 8) and got[:, :3].min() == 255 and got[:, 3:].max() == 0
    opaque = Image.new("RGBA", (8, 6), (255, 255, 255, 255))  # an alpha channel that hides nothing
    opaque.paste((0, 0, 0, 255), (4, 0, 8, 6))
    assert np.array_equal(np.asarray(load_mask(opaque)), np.asarray(opaque.convert("L")))
    grey = Image.new("L", (8, 6), 0)
    grey.paste(255, (0, 0, 8, 2))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turned 90 degrees clockwise to show
    grey.save(buf, format="JPEG", exif=exif, quality=100)
    turned = load_mask(buf.getvalue())
    assert turned.size == (6, 8) and turned.size == load_image(buf.getvalue()).size
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="not an image the studio reads"):
        load_mask(tmp_path / "bad.png")


def test_window_shows_photos_and_masks_as_the_generator_reads_them(qtbot, tmp_path):
    """A photo turned by its EXIF orientation is shown turned (Qt does not turn it by itself), so a mask painted
    over it has the size and orientation of the image the generator gets; a recipe's mask with transparency shows
    as the generator reads it (its alpha)."""
    from engine.images import load_image
    from studio.gui.image_input import ImageInput, read_image

    photo = Image.new("RGB", (8, 6), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    photo.save(tmp_path / "photo.jpg", exif=exif)
    shown = read_image(tmp_path / "photo.jpg")
    assert (shown.width(), shown.height()) == load_image(tmp_path / "photo.jpg").size == (6, 8)
    widget = ImageInput()
    qtbot.addWidget(widget)
    widget.set_path(tmp_path / "photo.jpg")
    strokes = Image.new("RGBA", (6, 8), (255, 255, 255, 0))  # clear white: keep
    strokes.paste((255, 255, 255, 255), (0, 0, 3, 8))  # opaque: repaint
    strokes.save(tmp_path / "strokes.png")
    widget.canvas.load_mask(tmp_path / "strokes.png")
    mask = widget.canvas.mask
    assert (mask.width(), mask.height()) == (6, 8)
    assert mask.pixelColor(1, 4).value() == 255 and mask.pixelColor(5, 4).value() == 0


def test_the_paint_over_a_large_photo_is_drawn_at_the_size_shown(qtbot):
    """The overlay was built at the photo's full size on every repaint (a 24 MP photo: 0.5-1.3 s per mouse move
    while painting). It is now made at the size shown, and again only after the mask or that size changes; the mask
    itself keeps the photo's size."""
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QColor, QImage

    from studio.gui.mask_canvas import MaskCanvas

    canvas = MaskCanvas()
    qtbot.addWidget(canvas)
    canvas.resize(500, 400)
    canvas.show()
    qtbot.waitExposed(canvas)
    photo = QImage(3000, 2000, QImage.Format.Format_RGB32)
    photo.fill(QColor(10, 200, 30))
    canvas.set_image(photo)
    canvas.grab()
    assert canvas._overlay is None and not canvas.has_mask()  # nothing painted, nothing built
    rect = canvas.target_rect()
    canvas.paint_at(QPointF(rect.center()))
    canvas.grab()
    overlay = canvas._overlay
    assert overlay.size() == rect.size() and canvas.mask.size() == photo.size() and canvas.has_mask()
    canvas.grab()
    assert canvas._overlay is overlay  # a repaint with no change reuses it
    canvas.paint_at(QPointF(rect.center()), erase=True)
    canvas.grab()
    assert not canvas.has_mask() and canvas._overlay is None  # all erased: nothing to draw, nothing built
    canvas.resize(300, 300)
    canvas.paint_at(QPointF(canvas.target_rect().center()))
    canvas.grab()
    assert canvas._overlay.size() == canvas.target_rect().size()


def test_queue_add_takes_a_mask_and_keeps_it_absolute(studio, tmp_path, capsys, monkeypatch):
    import json

    from engine.jobqueue import JobQueue
    from studio.cli import main

    host, store, image, mask = studio
    monkeypatch.chdir(tmp_path)
    assert main(["queue", "add", "inpaint", "--image", image.name, "--mask", mask.name, "--seed", "1",
                 "--json"]) == 0
    job = JobQueue().get(json.loads(capsys.readouterr().out)["ids"][0]).job
    assert (job["image"], job["mask"]) == (str(image), str(mask))
    monkeypatch.chdir(tmp_path.parent)  # the worker runs elsewhere
    assert main(["queue", "run", "--until-empty"]) == 0
    from engine.history import History

    (row,) = History().list(limit=1)
    assert row.recipe["mask"]["sha256"] == record_sha(mask)


def record_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
