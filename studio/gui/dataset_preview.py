"""A few samples of a fine-tuning dataset: images with their captions, or the start of each text file."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize
from PySide6.QtWidgets import QLabel, QListView, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from engine.datasets import read_pairs, text_files
from engine.errors import UsageError

THUMB = 96
TEXT_CHARS = 160
HEAD_BYTES = 4096  # read of each text file shown


class DatasetPreview(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.summary = QLabel("Choose a dataset folder to see a few of its samples.")
        self.summary.setObjectName("dataset_summary")
        self.summary.setWordWrap(True)
        self.list = QListWidget()
        self.list.setObjectName("dataset_samples")
        self.list.setMinimumHeight(150)
        self.list.setMaximumHeight(190)
        self.list.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.summary)
        lay.addWidget(self.list)
        self.count = 0  # samples found in the folder

    def clear(self, text: str = "") -> None:
        self.list.clear()
        self.count = 0
        self.missing_captions = []  # images of the folder shown last that have no caption
        self.summary.setText(text)

    def show_folder(self, path: str, data: str, n: int = 8) -> None:
        """Show the first ``n`` samples of ``path`` for a fine-tuner whose data is ``data`` ("images" | "text");
        UsageError (and an empty preview) when the folder cannot be trained on, in the words the CLI would use."""
        self.clear()
        if data == "images":
            self._images(path, n)
        else:
            self._texts(path, n)

    def _images(self, path: str, n: int) -> None:
        from studio.gui.image_input import thumbnail

        pairs, missing = read_pairs(path)
        if missing:
            self.missing_captions = list(missing)
            raise UsageError(f"{len(missing)} image(s) in {path} have no same-named .txt caption ({missing[0]}, ...); "
                             "write them first with Tools > Caption a folder….")
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setGridSize(QSize(THUMB + 40, THUMB + 54))
        self.list.setMovement(QListView.Movement.Static)
        for image, caption in pairs[:n]:
            item = QListWidgetItem(thumbnail(image, THUMB), caption)
            item.setToolTip(f"{image.name}: {caption}")
            self.list.addItem(item)
        self.count = len(pairs)
        self.summary.setText(f"{len(pairs)} captioned image{'s' if len(pairs) != 1 else ''}"
                             + (f"; the first {min(n, len(pairs))}:" if len(pairs) > n else ":"))

    def _texts(self, path: str, n: int) -> None:
        """The first ``n`` files' beginnings and the total size: a preview reads at most a few kilobytes of each
        file shown (a 200 MB corpus blocked the window for seconds); the run reads and checks everything."""
        root = Path(path).expanduser()
        files = text_files(root)
        self.list.setViewMode(QListView.ViewMode.ListMode)
        self.list.setIconSize(QSize(0, 0))
        self.list.setGridSize(QSize())
        for f in files[:n]:
            try:
                with open(f, "rb") as fh:
                    head = fh.read(HEAD_BYTES).decode("utf-8-sig", errors="replace")
            except OSError as exc:
                raise UsageError(f"{f} cannot be read ({exc.strerror}).") from None
            text = " ".join(head.split())
            name = f.relative_to(root) if root.is_dir() else f.name
            more = len(text) > TEXT_CHARS or f.stat().st_size > HEAD_BYTES
            item = QListWidgetItem(f"{name}: {text[:TEXT_CHARS]}{'…' if more else ''}")
            item.setToolTip(head[:2000])
            self.list.addItem(item)
        size = sum(f.stat().st_size for f in files)
        self.count = len(files)
        self.summary.setText(f"{len(files)} text file{'s' if len(files) != 1 else ''}, {_size(size)}:")


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 10_000 else f"{n / 1e3:,.0f} kB" if n < 10_000_000 else f"{n / 1e6:,.0f} MB"
