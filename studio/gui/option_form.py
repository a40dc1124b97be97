"""A form built from a generator's option specs (engine.generators.Option)."""
from __future__ import annotations

import math

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLineEdit, QSlider,
                               QSpinBox, QWidget)

INT_LIMIT = 2**31 - 1
SLIDER_STEPS = 1000


LABELS = {"lr": "Learning rate"}


def label_for(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


class FloatField(QWidget):
    """A double spin box, with a slider beside it when the option has both bounds."""

    def __init__(self, opt, parent=None):
        super().__init__(parent)
        self.spin = QDoubleSpinBox()
        lo = opt.min if opt.min is not None else -1e9
        hi = opt.max if opt.max is not None else 1e9
        small = abs(opt.default) if opt.default and abs(opt.default) < 0.01 else 0  # a learning rate: 2e-3
        digits = -math.floor(math.log10(small)) if small else 0
        self.spin.setDecimals(digits + 3 if small else 3)
        self.spin.setRange(lo, hi)
        span = hi - lo if opt.min is not None and opt.max is not None else 10.0
        self.spin.setSingleStep(10.0 ** -(digits + 1) if small else _nice_step(span))
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.slider = None
        if opt.min is not None and opt.max is not None and math.isfinite(span) and span > 0:
            self.slider = QSlider(Qt.Orientation.Horizontal)
            self.slider.setRange(0, SLIDER_STEPS)
            self.slider.valueChanged.connect(self._from_slider)
            self.spin.valueChanged.connect(self._to_slider)
            lay.addWidget(self.slider, 1)
        lay.addWidget(self.spin)
        self.lo, self.hi = lo, hi
        self._exact = None  # (the exact value set, what the box showed for it)

    def _from_slider(self, pos: int) -> None:
        value = self.lo + (self.hi - self.lo) * pos / SLIDER_STEPS
        if abs(value - self.spin.value()) > (self.hi - self.lo) / SLIDER_STEPS / 2:
            self.spin.setValue(value)

    def _to_slider(self, value: float) -> None:
        pos = round((value - self.lo) / (self.hi - self.lo) * SLIDER_STEPS)
        self.slider.blockSignals(True)
        self.slider.setValue(pos)
        self.slider.blockSignals(False)

    def value(self) -> float:
        """The value set, exactly, while the box still shows it; what the box shows once it is edited."""
        shown = float(self.spin.value())
        return self._exact[0] if self._exact is not None and self._exact[1] == shown else shown

    def setValue(self, value: float) -> None:
        """Show ``value`` (rounded to the box's decimals) and keep it exact: a recipe's 0.8125 loaded into the
        window was replayed as 0.812."""
        value = float(value)
        self.spin.setValue(value)
        shown = float(self.spin.value())
        self._exact = (value, shown) if shown != value and self.lo <= value <= self.hi else None
        if self.slider is not None:
            self._to_slider(shown)


def _nice_step(span: float) -> float:
    if not math.isfinite(span) or span <= 0:
        return 0.1
    step = 10 ** math.floor(math.log10(span / 100))
    return max(step, 0.001)


class OptionForm(QWidget):
    """Holds one editor per option; ``values()`` gives typed values, ``set_values()`` loads a recipe's options."""

    changed = Signal()

    def __init__(self, options=(), parent=None):
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.options = {}
        self.editors = {}
        self.set_options(options)

    def set_options(self, options) -> None:
        while self.layout_.rowCount():
            self.layout_.removeRow(0)
        self.options = {o.name: o for o in options}
        self.defaults = {o.name: o.default for o in options}  # the chosen model's defaults (set_defaults)
        self.editors = {}
        for opt in options:
            editor = self._editor(opt)
            editor.setObjectName(f"option_{opt.name}")
            editor.setToolTip(opt.help)
            self.editors[opt.name] = editor
            self.layout_.addRow(label_for(opt.name), editor)
            label = self.layout_.labelForField(editor)
            if label is not None:
                label.setToolTip(opt.help)
            self._set(opt, editor, opt.default)

    def _editor(self, opt) -> QWidget:
        if opt.choices:
            combo = QComboBox()
            for c in opt.choices:
                combo.addItem(str(c), c)
            combo.currentIndexChanged.connect(self.changed)
            return combo
        if opt.type == "bool":
            box = QCheckBox()
            box.toggled.connect(self.changed)
            return box
        if opt.type == "int":
            spin = QSpinBox()
            lo = int(max(opt.min, -INT_LIMIT)) if opt.min is not None else -INT_LIMIT
            hi = int(min(opt.max, INT_LIMIT)) if opt.max is not None else INT_LIMIT
            spin.setRange(lo, hi)
            spin.valueChanged.connect(self.changed)
            return spin
        if opt.type == "float":
            field = FloatField(opt)
            field.spin.valueChanged.connect(self.changed)
            return field
        edit = QLineEdit()
        edit.textChanged.connect(self.changed)
        return edit

    def _get(self, opt, editor):
        if isinstance(editor, QComboBox):
            return editor.currentData()
        if isinstance(editor, QCheckBox):
            return editor.isChecked()
        if isinstance(editor, QSpinBox):
            return int(editor.value())
        if isinstance(editor, FloatField):
            return editor.value()
        return editor.text()

    def _set(self, opt, editor, value) -> None:
        if isinstance(editor, QComboBox):
            idx = editor.findData(value)
            if idx < 0:
                raise ValueError(f"{value!r} is not a choice")
            editor.setCurrentIndex(idx)
        elif isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(int(value))
        elif isinstance(editor, FloatField):
            editor.setValue(float(value))
        else:
            editor.setText(str(value))

    def values(self) -> dict:
        return {name: self._get(self.options[name], ed) for name, ed in self.editors.items()}

    def set_values(self, values: dict) -> list:
        """Apply the values that are known and valid; returns the names that were skipped."""
        skipped = []
        for name, value in (values or {}).items():
            opt = self.options.get(name)
            if opt is None:
                skipped.append(name)
                continue
            try:
                self._set(opt, self.editors[name], opt.parse(value))
            except Exception:  # noqa: BLE001 - a bad recipe value is skipped, not fatal
                skipped.append(name)
        return skipped

    def set_defaults(self, overrides: dict) -> None:
        """The defaults a model brings (engine.runner.model_option_defaults) over the generator's own: an option
        still at the old default moves to the new one, one the person changed stays; the tooltip says whose."""
        new = {o.name: overrides.get(o.name, o.default) for o in self.options.values()}
        current = self.values()
        for name, opt in self.options.items():
            editor = self.editors[name]
            if current[name] == self.defaults.get(name) and new[name] != current[name]:
                self._set(opt, editor, new[name])
            tip = opt.help + (f" (this model's default: {new[name]!r}, from its generation_config.json)"
                              if name in overrides else "")
            editor.setToolTip(tip)
        self.defaults = new

    def reset(self) -> None:
        for name, opt in self.options.items():
            self._set(opt, self.editors[name], self.defaults.get(name, opt.default))
