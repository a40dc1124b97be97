"""A few samples of a fine-tuning dataset: images with their captions, or the start of each text file."""
from __future__ import annotations

from PySide6.QtCore import QSize
from PySide6.QtWidgets import QLabel, QListView, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from engine.datasets import read_documents, read_pairs
from engine.errors import UsageError

THUMB = 96
TEXT_CHARS = 160


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
        docs = read_documents(path)
        self.list.setViewMode(QListView.ViewMode.ListMode)
        self.list.setIconSize(QSize(0, 0))
        self.list.setGridSize(QSize())
        for name in sorted(docs)[:n]:
            text = " ".join(docs[name].split())
            item = QListWidgetItem(f"{name}: {text[:TEXT_CHARS]}{'…' if len(text) > TEXT_CHARS else ''}")
            item.setToolTip(docs[name][:2000])
            self.list.addItem(item)
        chars = sum(len(t) for t in docs.values())
        self.count = len(docs)
        self.summary.setText(f"{len(docs)} text file{'s' if len(docs) != 1 else ''}, {chars:,} characters:")
