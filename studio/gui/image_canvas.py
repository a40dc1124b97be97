"""Shows a QImage scaled to fit with nearest-neighbour sampling (whole-number factors when enlarging)."""
from __future__ import annotations

import math

from PySide6.QtCore import QRect, QSize, Qt
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QSizePolicy, QWidget


class ImageCanvas(QWidget):
    def __init__(self, parent=None, placeholder: str = ""):
        super().__init__(parent)
        self.image = QImage()
        self.placeholder = placeholder
        self.caption = ""  # small text under the image (e.g. "preview, step 4/20")
        self.setMinimumSize(64, 64)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_image(self, image: QImage, caption: str = "") -> None:
        self.image = image if image is not None else QImage()
        self.caption = caption
        self.update()

    def clear(self) -> None:
        self.set_image(QImage())

    def sizeHint(self) -> QSize:
        return QSize(320, 320)

    def target_rect(self) -> QRect:
        area = self.rect().adjusted(4, 4, -4, -20 if self.caption else -4)
        iw, ih = self.image.width(), self.image.height()
        if iw <= 0 or ih <= 0 or area.width() <= 0 or area.height() <= 0:
            return QRect()
        scale = min(area.width() / iw, area.height() / ih)
        if scale >= 1:
            scale = math.floor(scale)  # crisp pixels: whole-number enlargement
        w, h = max(1, int(iw * scale)), max(1, int(ih * scale))
        return QRect(area.x() + (area.width() - w) // 2, area.y() + (area.height() - h) // 2, w, h)

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), QColor("#202124"))
        if self.image.isNull():
            p.setPen(QColor("#9aa0a6"))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self.placeholder)
        else:
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
            p.drawImage(self.target_rect(), self.image)
        if self.caption:
            p.setPen(QColor("#e8eaed"))
            p.drawText(self.rect().adjusted(4, 0, -4, -2), Qt.AlignmentFlag.AlignBottom | Qt.AlignmentFlag.AlignHCenter,
                       self.caption)
        p.end()
