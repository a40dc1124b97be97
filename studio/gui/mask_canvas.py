"""The input image with an inpainting mask painted over it (shown as white paint at 60 %): drag to paint (white in
the mask: repaint), with the right button to erase. The mask has the image's size and is written as a grey-scale PNG
for the generation."""
from __future__ import annotations

import hashlib
from pathlib import Path

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QColor, QImage, QPainter

from studio.gui.image_canvas import ImageCanvas


class MaskCanvas(ImageCanvas):
    def __init__(self, parent=None, placeholder: str = ""):
        super().__init__(parent, placeholder)
        self.mask = QImage()
        self.painting = False  # whether mouse drags paint the mask
        self.brush = 0.08  # brush radius as a share of the image's longer side
        self._overlay = None  # the paint as shown: an image of the widget's size, rebuilt after a change
        self._painted = None  # whether anything is painted; None: not known since the last erase

    def set_image(self, image: QImage, caption: str = "") -> None:
        super().set_image(image, caption)
        self.clear_mask()

    def clear_mask(self) -> None:
        if self.image.isNull():
            self.mask = QImage()
        else:
            self.mask = QImage(self.image.size(), QImage.Format.Format_Grayscale8)
            self.mask.fill(0)
        self._changed(False)

    def _changed(self, painted=None) -> None:
        self._overlay, self._painted = None, painted
        self.update()

    def load_mask(self, path) -> None:
        """A mask from a file (a recipe's), read as the generator reads it (engine.images.load_mask: its alpha
        when it has real transparency, else its grey levels), scaled to the image."""
        from engine.errors import UsageError
        from engine.images import load_mask

        try:
            m = load_mask(path)
        except UsageError:
            return
        if self.image.isNull():
            return
        mask = QImage(m.tobytes(), m.width, m.height, m.width, QImage.Format.Format_Grayscale8).copy()
        self.mask = mask.scaled(self.image.size())
        self._changed()

    def has_mask(self) -> bool:
        if self.mask.isNull():
            return False
        if self._painted is None:  # C speed: a Python loop over a photo's mask took 0.45 s (24 MP)
            self._painted = self.mask.constBits().tobytes().lstrip(b"\x00") != b""
        return self._painted

    def paint_at(self, pos: QPointF, erase: bool = False) -> None:
        """Paint (or erase) a round brush at ``pos`` in widget coordinates."""
        rect = self.target_rect()
        if self.mask.isNull() or rect.isEmpty():
            return
        x = (pos.x() - rect.x()) * self.image.width() / rect.width()
        y = (pos.y() - rect.y()) * self.image.height() / rect.height()
        r = max(1.0, self.brush * max(self.image.width(), self.image.height()))
        p = QPainter(self.mask)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor(0, 0, 0) if erase else QColor(255, 255, 255))
        p.drawEllipse(QPointF(x, y), r, r)
        p.end()
        self._changed(True if not erase else None)

    def mousePressEvent(self, event) -> None:
        if self.painting:
            self.paint_at(event.position(), event.button() == Qt.MouseButton.RightButton)

    def mouseMoveEvent(self, event) -> None:
        if self.painting and event.buttons() & (Qt.MouseButton.LeftButton | Qt.MouseButton.RightButton):
            self.paint_at(event.position(), bool(event.buttons() & Qt.MouseButton.RightButton))

    def paintEvent(self, event) -> None:
        """The image, then the paint at 60 % over it. The overlay is made at the size it is shown at, and only
        after the mask or that size changed: built at a 24 MP photo's full size on every repaint, it cost
        0.5-1.3 s per mouse move."""
        super().paintEvent(event)
        rect = self.target_rect()
        if self.mask.isNull() or rect.isEmpty() or not self.has_mask():
            return
        if self._overlay is None or self._overlay.size() != rect.size():
            shown = self.mask.scaled(rect.size(), Qt.AspectRatioMode.IgnoreAspectRatio,
                                     Qt.TransformationMode.FastTransformation)
            overlay = QImage(rect.size(), QImage.Format.Format_ARGB32)
            overlay.fill(QColor(255, 255, 255))
            overlay.setAlphaChannel(_alpha_of(shown))
            self._overlay = overlay
        p = QPainter(self)
        p.drawImage(rect, self._overlay)
        p.end()

    def save_mask(self, folder: Path) -> str | None:
        """The painted mask as a PNG in ``folder`` (named by its content), or None when nothing is painted."""
        if not self.has_mask():
            return None
        data = self.mask.constBits().tobytes()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"mask-{hashlib.sha256(data).hexdigest()[:16]}.png"
        if not path.exists() and not self.mask.save(str(path), "PNG"):
            raise OSError(f"cannot write {path}")
        return str(path)


def _alpha_of(mask: QImage) -> QImage:
    """A mask's grey values as an alpha channel scaled to 60 % (so the image shows through the paint)."""
    alpha = mask.copy()
    p = QPainter(alpha)
    p.setCompositionMode(QPainter.CompositionMode.CompositionMode_Multiply)
    p.fillRect(alpha.rect(), QColor(153, 153, 153))
    p.end()
    return alpha
