"""A waveform picture of audio samples (min/max per pixel column)."""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import QSizePolicy, QWidget


class Waveform(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.samples = None
        self.rate = 0
        self.position = -1.0  # playback position in seconds, -1 when stopped
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_audio(self, samples, rate: int) -> None:
        import numpy as np

        data = np.asarray(samples, dtype="float32")
        if data.ndim > 1:
            data = data.mean(axis=1)
        self.samples, self.rate = data, int(rate)
        self.update()

    def duration(self) -> float:
        return len(self.samples) / self.rate if self.samples is not None and self.rate else 0.0

    def sizeHint(self) -> QSize:
        return QSize(400, 140)

    def paintEvent(self, event) -> None:
        import numpy as np

        p = QPainter(self)
        p.fillRect(self.rect(), QColor("#202124"))
        w, h = self.width(), self.height()
        mid = h / 2
        p.setPen(QColor("#5f6368"))
        p.drawLine(0, int(mid), w, int(mid))
        if self.samples is not None and len(self.samples) and w > 0:
            n = len(self.samples)
            edges = np.linspace(0, n, w + 1).astype(int)
            p.setPen(QColor("#f0a04b"))
            peak = max(float(np.abs(self.samples).max()), 1e-6)
            for x in range(w):
                a, b = edges[x], max(edges[x + 1], edges[x] + 1)
                chunk = self.samples[a:min(b, n)]
                if len(chunk) == 0:
                    continue
                lo, hi = float(chunk.min()) / peak, float(chunk.max()) / peak
                p.drawLine(x, int(mid - hi * (mid - 4)), x, int(mid - lo * (mid - 4)))
            if self.position >= 0 and self.duration() > 0:
                p.setPen(QColor("white"))
                x = int(self.position / self.duration() * w)
                p.drawLine(x, 0, x, h)
            p.setPen(QColor("#e8eaed"))
            p.drawText(self.rect().adjusted(6, 4, -6, -4), Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignRight,
                       f"{self.duration():.2f} s, {self.rate} Hz")
        else:
            p.setPen(QColor("#9aa0a6"))
            p.drawText(self.rect().adjusted(0, 0, 0, -int(mid)), Qt.AlignmentFlag.AlignCenter,
                       "The sound's waveform appears here.")
        p.end()
