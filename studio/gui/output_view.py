"""The output view: streamed text, images with live previews, captions and audio, plus actions on a result."""
from __future__ import annotations

import shutil
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QImage, QTextCursor
from PySide6.QtWidgets import (QApplication, QFileDialog, QHBoxLayout, QPlainTextEdit, QPushButton,
                               QStackedWidget, QVBoxLayout, QWidget)

from engine.errors import UsageError
from studio.gui.audio_player import make_player
from studio.gui.image_canvas import ImageCanvas
from studio.gui.recipe_dialog import RecipeDialog
from studio.gui.util import breakable, button, column, guard, plain_label, row
from studio.gui.waveform import Waveform

KINDS = ("text", "image", "caption", "audio")


def kind_of(info) -> str:
    if info.makes == "text" and "image" in info.takes:
        return "caption"
    return info.makes


class OutputView(QWidget):
    replay_requested = Signal(dict)
    caption_requested = Signal(str)  # image path
    prompt_requested = Signal(str)  # text to use as an image prompt

    def __init__(self, parent=None):
        super().__init__(parent)
        self.recipe: dict = {}
        self.files: list = []
        self.kind = "text"
        self.player = None
        self.player_note = ""

        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setObjectName("output_text")
        self.text.setPlaceholderText("Generated text appears here, token by token.")
        self.canvas = ImageCanvas(placeholder="The image appears here, with previews while it is denoised.")
        caption_page = QWidget()
        self.caption_image = ImageCanvas(placeholder="Input image")
        self.caption_text = plain_label()
        self.caption_text.setWordWrap(True)
        self.caption_text.setObjectName("caption_text")
        self.caption_text.setStyleSheet("font-size: 16px; padding: 8px;")
        cl = QVBoxLayout(caption_page)
        cl.addWidget(self.caption_image, 3)
        cl.addWidget(self.caption_text, 1)
        audio_page = QWidget()
        self.waveform = Waveform()
        self.play_button = QPushButton("▶ Play")
        self.stop_button = QPushButton("■ Stop")
        self.audio_note = plain_label()
        self.audio_note.setWordWrap(True)
        al = QVBoxLayout(audio_page)
        al.addWidget(self.waveform, 1)
        ar = QHBoxLayout()
        ar.addWidget(self.play_button)
        ar.addWidget(self.stop_button)
        ar.addWidget(self.audio_note, 1)
        al.addLayout(ar)

        self.stack = QStackedWidget()
        self.pages = {"text": self.text, "image": self.canvas, "caption": caption_page, "audio": audio_page}
        for page in self.pages.values():
            self.stack.addWidget(page)

        self.info = plain_label()
        self.info.setObjectName("output_info")
        self.info.setWordWrap(True)
        self.save_button = button("Save as…", self.save_as)
        self.copy_button = button("Copy", self.copy)
        self.recipe_button = button("Recipe", self.show_recipe)
        self.replay_button = button("Replay", self.on_replay)
        self.caption_button = button("Caption this image", self.on_caption)
        self.prompt_button = button("Use as prompt", self.on_use_as_prompt)
        column(self, (self.stack, 1), self.info, row(self.save_button, self.copy_button, self.recipe_button,
                                                     self.replay_button, self.caption_button, self.prompt_button,
                                                     None), margins=(0, 0, 0, 0))

        self.play_button.clicked.connect(self.play)
        self.stop_button.clicked.connect(self.stop)
        self.can_caption = False
        self.can_prompt = False
        self._update_actions()

    # ----- state -----------------------------------------------------------------------------
    def set_kind(self, kind: str) -> None:
        self.kind = kind if kind in KINDS else "text"
        self.stack.setCurrentWidget(self.pages[self.kind])

    def set_targets(self, can_caption: bool, can_prompt: bool) -> None:
        """Whether a caption generator and an image generator exist (for the two hand-over actions)."""
        self.can_caption, self.can_prompt = can_caption, can_prompt
        self._update_actions()

    def _update_actions(self) -> None:
        has = bool(self.recipe)
        for b in (self.save_button, self.copy_button, self.recipe_button, self.replay_button):
            b.setEnabled(has)
        self.caption_button.setVisible(self.kind == "image")
        self.caption_button.setEnabled(has and self.can_caption and bool(self.image_file()))
        self.prompt_button.setVisible(self.kind in ("text", "caption"))
        self.prompt_button.setEnabled(has and self.can_prompt and bool(self.result_text()))
        self.play_button.setEnabled(self.kind == "audio" and self.player is not None and bool(self.files))
        self.stop_button.setEnabled(self.kind == "audio" and self.player is not None)

    def begin(self, kind: str, input_image: str = "") -> None:
        """Clear the view for a new generation of ``kind``."""
        self.recipe, self.files = {}, []
        self.set_kind(kind)
        self.text.clear()
        self.canvas.clear()
        self.caption_text.setText("…")
        if kind == "caption" and input_image:
            self._show_input_image(input_image)
        self.waveform.samples = None
        self.waveform.update()
        self.info.setText("Working…")
        self._update_actions()

    def append_text(self, piece: str) -> None:
        target = self.text if self.kind == "text" else None
        if target is not None:
            cursor = target.textCursor()
            cursor.movePosition(QTextCursor.MoveOperation.End)
            cursor.insertText(breakable(piece, cursor.positionInBlock()))
            target.setTextCursor(cursor)
            target.ensureCursorVisible()
        else:
            shown = self.caption_text.text()
            self.caption_text.setText(("" if shown == "…" else shown) + piece)

    def show_preview(self, image: QImage, caption: str = "") -> None:
        self.canvas.set_image(image, caption)

    def show_result(self, recipe: dict, files: list, qimage: QImage = None, audio=None) -> None:
        """The final output of a generation (or a history entry)."""
        self.recipe = dict(recipe)
        self.files = [str(f) for f in files]
        text = recipe.get("text")
        if self.kind == "text":
            shown = breakable(text) if text is not None else None
            if shown is not None and self.text.toPlainText() != shown:
                self.text.setPlainText(shown)
        elif self.kind == "caption":
            self.caption_text.setText(text or "")
            path = (recipe.get("image") or {}).get("path")
            if path and self.caption_image.image.isNull():
                self._show_input_image(path)
        elif self.kind == "image":
            if qimage is None and self.image_file():
                qimage = QImage(self.image_file())
            if qimage is not None:
                self.canvas.set_image(qimage, f"{qimage.width()}×{qimage.height()}")
        elif self.kind == "audio":
            if audio is None and self.files:
                audio = _read_audio(self.files[0])
            if audio is not None:
                self.waveform.set_audio(*audio)
            if self.player is None and not self.player_note:
                self.player, self.player_note = make_player(self)
            self.audio_note.setText(self.player_note)
        self.info.setText(_summary(recipe))
        self._update_actions()

    def _show_input_image(self, path: str) -> None:
        image = QImage(path)
        self.caption_image.set_image(image, Path(path).name if not image.isNull() else "")

    def image_file(self) -> str:
        return next((f for f in self.files if f.lower().endswith(".png")), "")

    def result_text(self) -> str:
        return self.recipe.get("text") or ""

    # ----- actions ---------------------------------------------------------------------------
    @guard
    def save_as(self) -> None:
        if not self.files:
            raise UsageError("There is no output to save yet.")
        src = Path(self.files[0])
        dest, _ = QFileDialog.getSaveFileName(self, "Save output as", src.name, f"*{src.suffix}")
        if dest:
            self.save_to(dest)

    def save_to(self, dest: str) -> Path:
        src = Path(self.files[0])
        dest = Path(dest)
        if not dest.suffix:
            dest = dest.with_suffix(src.suffix)
        if not src.is_file():
            raise UsageError(f"The output {src} is gone (moved or deleted), so it cannot be saved again.")
        if dest.exists() and dest.resolve() == src.resolve():
            return dest  # it is already there
        try:
            shutil.copyfile(src, dest)
        except OSError as exc:
            raise UsageError(f"Cannot save to {dest} ({exc.strerror or exc}); choose another place.") from None
        return dest

    @guard
    def copy(self) -> None:
        clip = QApplication.clipboard()
        if self.kind == "image" and not self.canvas.image.isNull():
            clip.setImage(self.canvas.image)
        elif self.kind in ("text", "caption"):
            clip.setText(self.result_text())
        elif self.files:
            clip.setText(self.files[0])

    @guard
    def show_recipe(self) -> None:
        RecipeDialog(self.recipe, self).exec()

    @guard
    def on_replay(self) -> None:
        if self.recipe:
            self.replay_requested.emit(dict(self.recipe))

    @guard
    def on_caption(self) -> None:
        if self.image_file():
            self.caption_requested.emit(self.image_file())

    @guard
    def on_use_as_prompt(self) -> None:
        if self.result_text():
            self.prompt_requested.emit(self.result_text())

    @guard
    def play(self) -> None:
        if self.player is not None and self.files:
            self.player.play(self.files[0])

    @guard
    def stop(self) -> None:
        if self.player is not None:
            self.player.stop()


def _read_audio(path: str):
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32")
    return data, rate


def _summary(recipe: dict) -> str:
    parts = [recipe.get("generator", "")]
    model = (recipe.get("model") or {}).get("name")
    if model:
        parts.append(f"model {model}")
    if recipe.get("backend"):
        parts.append(f"{recipe['backend']}/{recipe.get('device', '')}")
    if recipe.get("seed") is not None:
        parts.append(f"seed {recipe['seed']}")
    total = (recipe.get("timings") or {}).get("total_s")
    if total is not None:
        parts.append(f"{total:.2f} s")
    text = " · ".join(p for p in parts if p)
    if recipe.get("warnings"):
        text += "\n⚠ " + "; ".join(map(str, recipe["warnings"]))
    return text
