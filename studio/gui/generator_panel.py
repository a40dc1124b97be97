"""The controls for one generator: prompt, image input, option form, model/backend/device/seed, Generate/Cancel."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QRegularExpression, Qt, Signal
from PySide6.QtGui import QRegularExpressionValidator
from PySide6.QtWidgets import (QComboBox, QFormLayout, QFrame, QGroupBox, QLabel, QLineEdit, QPushButton,
                               QScrollArea, QToolButton, QVBoxLayout, QWidget)

from engine.errors import UsageError
from engine.generators import BACKENDS, DEVICES, digits
from engine.runner import MAX_PROMPT_CHARS, Job, model_option_defaults
from studio.gui.image_input import ImageInput
from studio.gui.lora_list import LoraList
from studio.gui.option_form import OptionForm
from studio.gui.util import PromptEdit, button, column, guard, idle_progress, plain_label, row


class GeneratorPanel(QWidget):
    generate_clicked = Signal()
    cancel_clicked = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.info = None
        self.title = plain_label()
        self.title.setObjectName("generator_title")
        self.title.setStyleSheet("font-size: 17px; font-weight: bold;")
        self.description = plain_label()
        self.description.setWordWrap(True)
        self.prompt_label = QLabel("Prompt")
        self.prompt = PromptEdit(MAX_PROMPT_CHARS, "a prompt")
        self.prompt.setObjectName("prompt")
        self.prompt.setPlaceholderText("Write a prompt… (Ctrl+Return generates)")
        self.prompt.setMaximumHeight(110)
        self.image_label = QLabel("Input image")
        self.image_input = ImageInput()

        self.options_box = QGroupBox("Options")
        self.form = OptionForm()
        self.reset_button = QPushButton("Defaults")
        ob = QVBoxLayout(self.options_box)
        ob.addWidget(self.form)
        ob.addWidget(self.reset_button, 0, Qt.AlignmentFlag.AlignRight)

        self.lora_box = QGroupBox("LoRA adapters")
        self.loras = LoraList()
        QVBoxLayout(self.lora_box).addWidget(self.loras)

        self.run_box = QGroupBox("Model and run")
        self.model = QComboBox()
        self.model.setObjectName("model")
        self.backend = QComboBox()
        self.backend.addItems(BACKENDS)
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.seed = QLineEdit()
        self.seed.setObjectName("seed")
        self.seed.setPlaceholderText("random")
        self.seed.setValidator(QRegularExpressionValidator(QRegularExpression(r"\d{0,18}")))
        self.seed.setToolTip("Leave empty for a random seed; a fixed seed reproduces a result.")
        self.random_seed = QToolButton()
        self.random_seed.setText("Random")
        self.random_seed.setToolTip("Random seed each time")
        self.reuse_seed = QToolButton()
        self.reuse_seed.setText("Last")
        self.reuse_seed.setToolTip("Reuse the last seed")
        self.last_seed = None
        rf = QFormLayout(self.run_box)
        rf.addRow("Model", self.model)
        rf.addRow("Backend", self.backend)
        rf.addRow("Device", self.device)
        rf.addRow("Seed", row((self.seed, 1), self.random_seed, self.reuse_seed))

        self.generate_button = QPushButton("Generate")
        self.generate_button.setObjectName("generate")
        self.generate_button.setToolTip("Generate (Ctrl+Return)")
        self.generate_button.setDefault(True)
        self.cancel_button = button("Cancel", self.cancel_clicked, "Cancel (Escape)")
        self.cancel_button.setEnabled(False)
        self.progress = idle_progress()
        self.progress.setTextVisible(True)
        self.progress_label = plain_label()

        body = QWidget()  # the form scrolls; Generate, Cancel and the progress stay in sight below it (at the
        column(body, self.title, self.description, self.prompt_label, self.prompt, self.image_label,  # default
               self.image_input, self.options_box, self.lora_box, self.run_box, None)  # size they were scrolled off)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)  # a large font scrolls
        self.scroll.setWidget(body)
        footer = QWidget()
        column(footer, row((self.generate_button, 1), self.cancel_button), self.progress, self.progress_label)
        column(self, (self.scroll, 1), footer, margins=(0, 0, 0, 0))

        self.generate_button.clicked.connect(self.generate_clicked)
        self.reset_button.clicked.connect(self.form.reset)
        self.random_seed.clicked.connect(self.seed.clear)
        self.model.currentIndexChanged.connect(self.apply_model_defaults)
        self.reuse_seed.clicked.connect(self.on_reuse_seed)

    # ----- configuration ---------------------------------------------------------------------
    def set_generator(self, info, models: list, default_model: str = "") -> None:
        self.info = info
        self.title.setText(info.title)
        self.description.setText(info.description)
        takes_text, takes_image = "text" in info.takes, "image" in info.takes
        self.prompt_label.setVisible(takes_text)
        self.prompt.setVisible(takes_text)
        self.image_label.setVisible(takes_image)
        self.image_input.setVisible(takes_image)
        self.image_input.set_mask_enabled("mask" in info.takes)
        self.image_label.setText("Input image" if info.image_required else "Input image (optional)")
        self.form.set_options(info.options)
        self.options_box.setVisible(bool(info.options))
        self.lora_box.setVisible(info.takes_lora)
        self.set_models(models, default_model)

    def set_models(self, models: list, default_model: str = "") -> None:
        self._entries = {e.name: e for e in models}
        self.model.clear()
        needs_model = bool(self.info and self.info.families)
        for e in models:
            label = f"{e.title or e.name} ({e.family}{', built-in' if e.builtin else ''})"
            self.model.addItem(label, e.name)
        if not needs_model:
            self.model.addItem("(no model needed)", "")
        elif not models:
            self.model.addItem("(no model installed: import one in Models…)", "")
        idx = self.model.findData(default_model) if default_model else -1
        self.model.setCurrentIndex(max(idx, 0))
        self.apply_model_defaults()
        self.model.setEnabled(needs_model and bool(models))
        self.backend.setEnabled(needs_model)
        self.device.setEnabled(needs_model)

    def apply_model_defaults(self) -> None:
        """The chosen model's option defaults (its generation_config.json) shown in the form."""
        entry = getattr(self, "_entries", {}).get(self.model.currentData() or "")
        if self.info is not None:
            self.form.set_defaults(model_option_defaults(self.info, entry))

    def set_busy(self, busy: bool) -> None:
        self.generate_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    # ----- values ----------------------------------------------------------------------------
    def seed_value(self):
        text = self.seed.text().strip()
        if text and not digits(text):
            raise UsageError(f"The seed must be a whole number (or empty for a random one), not {text!r}.")
        return int(text) if text else None

    def job(self) -> Job:
        if self.info is None:
            raise UsageError("Choose a generator first.")
        info = self.info
        prompt = self.prompt.toPlainText() if "text" in info.takes else None
        if prompt is not None and not prompt.strip():
            if info.prompt_required and "image" not in info.takes:
                raise UsageError(f"{info.title} needs a prompt; write one in the prompt box.")
            prompt = None
        image = self.image_input.path or None if "image" in info.takes else None
        if "image" in info.takes and info.image_required and not image:
            raise UsageError(f"{info.title} needs an input image; drop one on the image box or click Browse.")
        mask = self.image_input.mask_path() if image and "mask" in info.takes else None
        return Job(info.id, prompt=prompt, image=image, mask=mask, model=self.model.currentData() or None,
                   backend=self.backend.currentText(), device=self.device.currentText(), seed=self.seed_value(),
                   options=self.form.values(), loras=self.loras.specs() if info.takes_lora else [])

    def state(self) -> dict:
        """What to remember between sessions for this generator."""
        return {"options": self.form.values(), "model": self.model.currentData() or "",
                "seed": self.seed.text(), "prompt": self.prompt.toPlainText()}

    def restore(self, saved: dict) -> None:
        self.form.set_values(saved.get("options") or {})
        idx = self.model.findData(saved.get("model")) if saved.get("model") else -1
        if idx >= 0:
            self.model.setCurrentIndex(idx)
        seed = str(saved.get("seed") or "")
        self.seed.setText(seed if digits(seed) else "")
        if saved.get("prompt") is not None:
            self.prompt.setPlainText(saved["prompt"])

    def apply_recipe(self, recipe: dict) -> list:
        """Put a recipe's prompt, options, seed, model, backend and input image into the form.

        Returns what could not be applied (unknown options, a model that is not installed)."""
        if "text" in self.info.takes:
            self.prompt.setPlainText(recipe.get("prompt") or "")
        skipped = self.form.set_values(recipe.get("options") or {})
        if recipe.get("seed") is not None:
            self.seed.setText(str(recipe["seed"]))
        model = (recipe.get("model") or {}).get("name") if isinstance(recipe.get("model"), dict) else recipe.get("model")
        if model:
            idx = self.model.findData(model)
            if idx >= 0:
                self.model.setCurrentIndex(idx)
            else:
                skipped.append(f"model {model} (not installed)")
        if recipe.get("backend"):
            self.set_pickers(recipe["backend"], self.device.currentText())
        if self.info.takes_lora:
            self.loras.set_specs(recipe.get("loras"))
        image = (recipe.get("image") or {}).get("path") if isinstance(recipe.get("image"), dict) else None
        if image and "image" in self.info.takes and Path(image).exists():
            self.image_input.set_path(image)
            mask = (recipe.get("mask") or {}).get("path") if isinstance(recipe.get("mask"), dict) else None
            if mask and "mask" in self.info.takes and Path(mask).exists():
                self.image_input.canvas.load_mask(mask)
        return skipped

    def set_pickers(self, backend: str, device: str) -> None:
        if backend in BACKENDS:
            self.backend.setCurrentText(backend)
        if device in DEVICES:
            self.device.setCurrentText(device)

    @guard
    def on_reuse_seed(self) -> None:
        if self.last_seed is None:
            raise UsageError("There is no previous seed yet; generate once first.")
        self.seed.setText(str(self.last_seed))

    # ----- progress --------------------------------------------------------------------------
    def show_progress(self, step: int, total: int, left_s=None, message: str = "") -> None:
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(step, total))
            left = f" · {left_s:.0f} s left" if left_s is not None else ""
            self.progress.setFormat(f"step %v/%m{left}")
        else:
            self.progress.setRange(0, 0)  # busy indicator
        self.progress_label.setText(message)

    def reset_progress(self, text: str = "idle") -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat(text)
