"""The image input of generators that take an image: a drop target with a Browse button, and for generators that
take an inpainting mask, a brush to paint it over the image."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QIcon, QImageReader, QPixmap
from PySide6.QtWidgets import QFileDialog, QLabel, QSizePolicy, QSlider, QWidget

from engine.errors import UsageError
from studio.gui.mask_canvas import MaskCanvas
from studio.gui.util import button, column, dropped_files, guard, row

IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.bmp *.webp *.gif);;All files (*)"


def read_image(path: Path):
    """Load a QImage or raise UsageError with a clear sentence; a photo's EXIF orientation is applied, as the
    engine reads it (engine.images), so a mask painted over it lines up with what the generator gets."""
    reader = QImageReader(str(path))
    reader.setAllocationLimit(256)  # MB: refuse decompression bombs
    reader.setAutoTransform(True)
    image = reader.read()
    if image.isNull():
        raise UsageError(f"Cannot read {Path(path).name} as an image ({reader.errorString()}).")
    return image


def thumbnail(path, size: int) -> QIcon:
    """An icon of the image at ``path`` within ``size`` pixels (an empty one when it cannot be read)."""
    try:
        image = read_image(Path(path))
    except UsageError:
        return QIcon()
    return QIcon(QPixmap.fromImage(image.scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                                Qt.TransformationMode.SmoothTransformation)))


class ImageInput(QWidget):
    changed = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.path = ""
        self.canvas = MaskCanvas(placeholder="Drop an image here\nor click Browse")
        self.canvas.setMinimumHeight(120)
        self.canvas.setMaximumHeight(200)
        self.name = QLabel("No image")
        self.name.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)  # long names never widen
        self.browse = button("Browse…", self.on_browse)
        self.clear_button = button("Clear", self.clear)
        self.paint_button = button("Paint mask", tip="Paint the part to repaint (drag; the right button erases)")
        self.paint_button.setCheckable(True)
        self.paint_button.toggled.connect(self.on_paint)
        self.brush = QSlider(Qt.Orientation.Horizontal)
        self.brush.setRange(1, 30)
        self.brush.setValue(8)
        self.brush.setToolTip("Brush size")
        self.brush.valueChanged.connect(lambda v: setattr(self.canvas, "brush", v / 100))
        self.clear_mask_button = button("Clear mask", self.canvas.clear_mask)
        self.mask_row = QWidget()
        lay = row(self.paint_button, (self.brush, 1), self.clear_mask_button)
        lay.setContentsMargins(0, 0, 0, 0)
        self.mask_row.setLayout(lay)
        self.mask_row.hide()
        column(self, self.canvas, row((self.name, 1), self.browse, self.clear_button), self.mask_row,
               margins=(0, 0, 0, 0))
        self.setAcceptDrops(True)

    def set_mask_enabled(self, enabled: bool) -> None:
        """Show the mask brush (for generators that take an inpainting mask)."""
        self.mask_row.setVisible(enabled)
        if not enabled:
            self.paint_button.setChecked(False)

    def on_paint(self, on: bool) -> None:
        self.canvas.painting = on
        self.canvas.setCursor(Qt.CursorShape.CrossCursor if on else Qt.CursorShape.ArrowCursor)

    def mask_path(self) -> str | None:
        """The painted mask saved as a PNG under the state folder, or None when none is painted."""
        if self.mask_row.isHidden():
            return None
        from engine import state

        return self.canvas.save_mask(state.home() / "inputs" / "masks")

    @guard
    def on_browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose an image", "", IMAGE_FILTER)
        if path:
            self.set_path(path)

    def set_path(self, path) -> None:
        """Show the image at ``path``; raises UsageError when it cannot be read (nothing changes)."""
        image = read_image(Path(path))
        self.path = str(path)
        self.canvas.set_image(image, f"{image.width()}×{image.height()}")
        self.name.setText(Path(path).name)
        self.name.setToolTip(str(path))
        self.changed.emit(self.path)

    def clear(self) -> None:
        self.path = ""
        self.canvas.clear()
        self.name.setText("No image")
        self.changed.emit("")

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    @guard
    def dropEvent(self, event) -> None:
        self.drop_mime(event.mimeData())
        event.acceptProposedAction()

    @guard
    def drop_mime(self, mime) -> None:
        self.set_path(dropped_files(mime, "Only image files can be dropped here.")[0])
