"""Small Qt helpers shared by the widgets: slot guarding, PIL -> QImage, default icons."""
from __future__ import annotations

import functools
import inspect
import logging

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontDatabase, QIcon, QImage, QPainter, QPixmap
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QLayout, QPlainTextEdit, QProgressBar, QPushButton,
                               QVBoxLayout)

from engine.errors import describe_exception

log = logging.getLogger(__name__)

KIND_COLOURS = {"text": "#3b6fd8", "image": "#2f9e5b", "audio": "#d8842b"}


def report_error(widget, exc: BaseException, context: str = "") -> None:
    """Show an exception in the window that holds ``widget`` (its error banner), or log it."""
    message, details = describe_exception(exc)
    if context:
        message = f"{context}: {message}"
    target = widget
    while target is not None:
        show = getattr(target, "show_error", None)
        if callable(show):
            try:
                show(message, details)
                return
            except Exception:  # noqa: BLE001 - the reporter itself must never raise
                break
        parent = target.parentWidget() if hasattr(target, "parentWidget") else None
        target = parent
    log.error("%s\n%s", message, details)


LONG_LINE = 2000  # characters; Qt lays a line out in time that grows faster than its length (100k: 1 s, 200k: 4 s)


def breakable(text: str, column: int = 0) -> str:
    """``text`` for a read-only view: a line longer than LONG_LINE characters is shown broken after every LONG_LINE
    (``column``: the characters already on the view's last line, when ``text`` is appended). The view alone
    changes; Copy, Save and the history keep the text itself."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        start = column if i == 0 else 0
        if start + len(line) > LONG_LINE:
            first = max(0, LONG_LINE - start)
            lines[i] = "\n".join([line[:first]] + [line[j:j + LONG_LINE] for j in range(first, len(line), LONG_LINE)])
    return "\n".join(lines)


def plain_label(text: str = "") -> QLabel:
    """A label that shows its text as it is. A QLabel guesses rich text by default: a chat message, a caption, a
    plugin's description or an error quoting a prompt holding ``<img src="/dev/zero">`` was rendered as HTML, and
    Qt read that file forever on the window's thread."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.PlainText)
    return label


def guard(fn):
    """Wrap a slot so that an exception shows in the window instead of escaping into Qt.

    Extra positional arguments that a signal passes (``clicked(bool)``) are dropped when the
    slot does not take them.
    """
    params = list(inspect.signature(fn).parameters.values())[1:]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    npos = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *(args if varargs else args[:npos]))
        except Exception as exc:  # noqa: BLE001 - nothing a user does may crash the window
            report_error(self, exc)
            return None

    return wrapper


def pil_to_qimage(image) -> QImage:
    """A deep-copied RGBA QImage of a PIL image (safe to build in a worker thread)."""
    im = image.convert("RGBA")
    data = im.tobytes("raw", "RGBA")
    qimg = QImage(data, im.width, im.height, 4 * im.width, QImage.Format.Format_RGBA8888)
    return qimg.copy()


def default_icon(title: str, kind: str = "text", size: int = 64) -> QIcon:
    """A rounded square in the kind's colour with the title's first letter, drawn in code."""
    pix = QPixmap(size, size)
    pix.fill(Qt.GlobalColor.transparent)
    p = QPainter(pix)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    p.setBrush(QColor(KIND_COLOURS.get(kind, "#777777")))
    p.setPen(Qt.PenStyle.NoPen)
    p.drawRoundedRect(QRectF(2, 2, size - 4, size - 4), size * 0.2, size * 0.2)
    font = QFont()
    font.setBold(True)
    font.setPixelSize(int(size * 0.55))
    p.setFont(font)
    p.setPen(QColor("white"))
    p.drawText(QRectF(0, 0, size, size), Qt.AlignmentFlag.AlignCenter, (title[:1] or "?").upper())
    p.end()
    icon = QIcon(pix)
    icon.addPixmap(pix, QIcon.Mode.Selected)  # keep the colour when the row is selected
    return icon


def generator_icon(info) -> QIcon:
    """The icon a generator's plugin names (a file path), else the default icon."""
    if info.icon:
        icon = QIcon(str(info.icon))
        if not icon.isNull():
            return icon
    return default_icon(info.title or info.id, info.makes)


def row_table(model):
    """A read-only table view over ``model``: whole-row single selection, columns fitted, no row numbers."""
    from PySide6.QtWidgets import QHeaderView, QTableView

    table = QTableView()
    table.setModel(model)
    table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().hide()
    return table


class RowsTableModel(QAbstractTableModel):
    """A table over a Python list ``self.rows``, one column per name in the subclass's COLUMNS."""

    COLUMNS: tuple = ()

    def __init__(self, rows=(), parent=None):
        super().__init__(parent)
        self.rows = list(rows)

    def set_rows(self, rows) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.COLUMNS[section]
        return None


# ----- building layouts ---------------------------------------------------------------------------------------
def row(*items) -> QHBoxLayout:
    """A horizontal layout of widgets and layouts, in order: ``None`` adds a stretch, ``(item, n)`` gives the item
    stretch ``n``."""
    return _fill(QHBoxLayout(), items)


def column(parent, *items, margins=None) -> QVBoxLayout:
    """The vertical layout of ``parent``, filled as ``row`` fills a row; ``margins`` = (left, top, right, bottom)."""
    lay = QVBoxLayout(parent)
    if margins is not None:
        lay.setContentsMargins(*margins)
    return _fill(lay, items)


def _fill(lay, items):
    for item in items:
        item, stretch = item if isinstance(item, tuple) else (item, 0)
        if item is None:
            lay.addStretch(1)
        elif isinstance(item, QLayout):
            lay.addLayout(item, stretch)
        else:
            lay.addWidget(item, stretch)
    return lay


def idle_progress() -> QProgressBar:
    """A progress bar at rest, reading "idle"."""
    bar = QProgressBar()
    bar.setRange(0, 1)
    bar.setValue(0)
    bar.setFormat("idle")
    return bar


def monospace(widget, placeholder: str = ""):
    """``widget`` (a text view) read-only, in the system's fixed-width font, with a placeholder text."""
    widget.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
    if hasattr(widget, "setReadOnly"):
        widget.setReadOnly(True)
    if placeholder:
        widget.setPlaceholderText(placeholder)
    return widget


def dropped_files(mime, what: str) -> list:
    """The local files of a drop; UsageError("``what``") when it holds none."""
    from engine.errors import UsageError

    files = [u.toLocalFile() for u in mime.urls() if u.isLocalFile()]
    if not files:
        raise UsageError(what)
    return files


def with_folder(parent, title: str, then, start: str = "") -> None:
    """Ask for a folder (starting at ``start``) and call ``then(path)`` with the choice, unless the user cancels."""
    path = QFileDialog.getExistingDirectory(parent, title, start)
    if path:
        then(path)


def choose_folder_into(parent, title: str, line_edit) -> None:
    """Ask for a folder (starting at the line edit's text) and put the choice into the line edit."""
    with_folder(parent, title, line_edit.setText, line_edit.text())


def button(text: str, slot=None, tip: str = "", name: str = "") -> QPushButton:
    """A push button, its ``clicked`` connected to ``slot`` (``name``: its object name, which tests find it by)."""
    b = QPushButton(text)
    if slot is not None:
        b.clicked.connect(slot)
    if tip:
        b.setToolTip(tip)
    if name:
        b.setObjectName(name)
    return b


class PromptEdit(QPlainTextEdit):
    """A text box that refuses a paste (or drop) that would make its text longer than ``limit`` characters, with a
    sentence (``refused``): Qt stalls for seconds to minutes laying out a pasted line of 100,000s of characters.
    The prompt box's limit is what a job takes (engine.runner.MAX_PROMPT_CHARS)."""

    refused = Signal(str)

    def __init__(self, limit: int, what: str, parent=None):
        super().__init__(parent)
        self.limit, self.what = limit, what

    def insertFromMimeData(self, source) -> None:
        text = source.text() if source.hasText() else ""
        room = self.limit - len(self.toPlainText()) + len(self.textCursor().selectedText())
        if len(text) > room:
            self.refused.emit(f"The pasted text is {len(text):,} characters; {self.what} holds at most "
                              f"{self.limit:,} ({max(room, 0):,} more here), so nothing was pasted.")
            return
        super().insertFromMimeData(source)
