"""The conversation view of the ``chat`` generator: a system prompt, the turns as blocks (copy, edit and continue
from any turn, regenerate the last answer), the streamed answer, the message box and a context meter.

The view holds the conversation as plain ``engine.chat.Message`` values; the main window turns it into a Job and
streams the answer back with ``begin_answer`` / ``append_text`` / ``finish_answer`` / ``abort_answer``. The meter
counts tokens with the model's own template and tokenizer (jinja2 and ``tokenizers``, no torch).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QApplication, QFrame, QLabel, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton,
                               QScrollArea, QVBoxLayout, QWidget)

from engine import chat
from engine.errors import StudioError, UsageError

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 100_000  # a message box's paste limit (far past any context the studio runs; Qt lays a line
# of 100,000 characters out in about a second)
SHOWN_CHARS = 20_000  # a turn shows this much of its text (answers are far shorter; a pasted or imported one may
# not be: 40 turns of 90,000 characters froze the window for 8 s)
INLINE_CHARS = 20_000  # a conversation this long is counted at once (a few ms); a longer one in the meter's thread
ROLE_TITLES = {"user": "You", "assistant": "Model", "system": "System"}
ROLE_STYLES = {"user": "background: #e8f0fe; border-radius: 8px;",
               "assistant": "background: #f1f3f4; border-radius: 8px;"}
from studio.gui.util import PromptEdit, breakable, button, column, plain_label, row


class TurnBlock(QFrame):
    """One turn: who, the text, and Copy / Edit (Edit turns into "Continue from here" while editing). A turn longer
    than SHOWN_CHARS shows its beginning (Qt lays a long wrapped label out in seconds); Copy and Edit have it all."""

    copy_clicked = Signal(object)
    continue_clicked = Signal(object)

    def __init__(self, message: chat.Message, parent=None):
        super().__init__(parent)
        self.role = message.role
        self.full = message.content
        self.setStyleSheet(ROLE_STYLES.get(message.role, ""))
        self.setObjectName(f"turn_{message.role}")
        self.who = QLabel(f"<b>{ROLE_TITLES[message.role]}</b>")
        self.text = plain_label()
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.editor = QPlainTextEdit()  # filled when Edit is clicked
        self.editor.setVisible(False)
        self.editor.setMaximumHeight(120)
        self.copy_button = button("Copy", lambda: self.copy_clicked.emit(self))
        self.edit_button = button("Edit", self.on_edit,
                                  "Change this turn; the turns after it are left out when you continue")
        column(self, row((self.who, 1), self.copy_button, self.edit_button), self.text, self.editor,
               margins=(8, 4, 8, 6))
        self.set_content(message.content)

    @property
    def content(self) -> str:
        return self.full

    def set_content(self, text: str) -> None:
        self.full = text
        shown = text if len(text) <= SHOWN_CHARS else \
            text[:SHOWN_CHARS] + f"\n… ({len(text) - SHOWN_CHARS:,} more characters: Copy and Edit have them all)"
        self.text.setText(breakable(shown))
        if self.editing:
            self.editor.setPlainText(text)

    @property
    def editing(self) -> bool:
        return self.editor.isVisible()

    def on_edit(self) -> None:
        if not self.editing:
            self.editor.setPlainText(self.content)
            self.editor.setVisible(True)
            self.text.setVisible(False)
            self.edit_button.setText("Continue from here")
            return
        self.continue_clicked.emit(self)

    def end_edit(self) -> None:
        self.set_content(self.editor.toPlainText())
        self.editor.setVisible(False)
        self.text.setVisible(True)
        self.edit_button.setText("Edit")


class ChatView(QWidget):
    """Signals: ``send_requested`` (generate the next answer), ``regenerate_requested``, ``changed`` (the
    conversation or the message box changed: the meter is recounted)."""

    send_requested = Signal()
    regenerate_requested = Signal()
    continue_requested = Signal()  # answer the conversation as it stands (an edited turn), not the message box

    def __init__(self, parent=None):
        super().__init__(parent)
        self.template: Optional[chat.ChatTemplate] = None
        self.tokenizer: Optional[chat.TokenMemo] = None  # counts remembered: the meter's count serves Send
        # a long conversation is counted in a thread that sees only the text and the tokenizer (never a widget:
        # a widget whose last reference went away there would be deleted outside the window's thread); the
        # window's thread looks for the count every 25 ms until it is there
        self.counter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-meter")
        self.count_number = 0  # the newest count asked for; an older one that arrives late is not shown
        self.counting = None  # (its number, the Future) while a count runs in the thread
        self.ahead = None  # the Future working out, after it, which turns Send would leave out
        self.count_poll = QTimer(self)
        self.count_poll.setInterval(25)
        self.count_poll.timeout.connect(self.poll_count)
        self.context = 0
        self.max_new_tokens = 200
        self.turns: list = []  # TurnBlock
        self.answer: Optional[TurnBlock] = None  # the block being streamed
        self.pending_user: Optional[str] = None  # the message box's text while its answer is written
        self.regenerated: Optional[str] = None  # the answer Regenerate replaced, until the new one is written

        self.note = plain_label()
        self.note.setObjectName("chat_note")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #8a5300;")
        self.note.setVisible(False)
        self.system = QPlainTextEdit()
        self.system.setObjectName("system_prompt")
        self.system.setPlaceholderText("System prompt (optional): who the model is, how it answers")
        self.system.setMaximumHeight(60)
        self.turn_area = QWidget()
        self.turn_layout = QVBoxLayout(self.turn_area)
        self.turn_layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setWidget(self.turn_area)
        self.input = PromptEdit(MAX_MESSAGE_CHARS, "a message")  # (a pasted 300,000-character line froze it)
        self.input.setObjectName("chat_input")
        self.input.setPlaceholderText("Write a message… (Ctrl+Return sends)")
        self.input.setMaximumHeight(90)
        self.send_button = QPushButton("Send")
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Write the last answer again")
        self.new_button = QPushButton("New conversation")
        self.meter = QProgressBar()
        self.meter.setObjectName("context_meter")
        self.meter.setTextVisible(True)
        self.meter_label = plain_label()
        self.meter_label.setObjectName("meter_label")
        column(self, self.note, self.system, (self.scroll, 1), self.input,
               row((self.send_button, 1), self.regenerate_button, self.new_button), self.meter, self.meter_label)

        self.recount_timer = QTimer(self)
        self.recount_timer.setSingleShot(True)
        self.recount_timer.setInterval(120)
        self.recount_timer.timeout.connect(self.update_meter)
        self.input.textChanged.connect(self.recount_timer.start)
        self.system.textChanged.connect(self.recount_timer.start)
        self.send_button.clicked.connect(self.send_requested)
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        self.new_button.clicked.connect(self.clear)
        self.update_meter()

    # ----- the model -------------------------------------------------------------------------
    def set_model(self, entry, max_new_tokens: int) -> None:
        """Load the template and tokenizer of a model store entry (None: no model) for the meter."""
        from engine.tokenizer import load_tokenizer

        self.template, self.tokenizer, self.context = None, None, 0
        self.max_new_tokens = max_new_tokens
        note = ""
        if entry is not None:
            try:
                self.template = chat.load_template(entry.path, entry.name)
                self.tokenizer = chat.TokenMemo(load_tokenizer(entry.path))
                self.context = chat.context_length(entry.config)
                if self.template.fallback:
                    note = chat.FALLBACK_NOTE
            except StudioError as exc:
                self.template = None
                note = str(exc)
        self.note.setText(note)
        self.note.setVisible(bool(note))
        self.update_meter()

    def set_max_new_tokens(self, n: int) -> None:
        self.max_new_tokens = n
        self.update_meter()

    # ----- the conversation ------------------------------------------------------------------
    def messages(self) -> list:
        """The conversation so far: the system prompt (when written) and every turn."""
        out = [chat.Message("system", self.system.toPlainText())] if self.system.toPlainText().strip() else []
        return out + [chat.Message(t.role, t.content) for t in self.turns if t is not self.answer]

    def next_messages(self, regenerate: bool = False, draft: bool = True) -> list:
        """The conversation to answer now: the turns plus the message box as a user turn (when written and
        ``draft``); to ``regenerate``, the turns before the last answer."""
        msgs = self.messages()
        if regenerate:
            if not self.turns or self.turns[-1].role != "assistant":
                raise UsageError("There is no answer to regenerate yet.")
            return msgs[:-1]
        text = self.input.toPlainText() if draft else ""
        if text.strip():
            msgs.append(chat.Message("user", text))
        if not msgs or msgs[-1].role != "user":
            raise UsageError("Write a message first; the model answers the last user message.")
        return msgs

    def fit(self, messages=None) -> Optional[chat.Fit]:
        if self.template is None or self.tokenizer is None:
            return None
        msgs = self.next_messages() if messages is None else messages
        return chat.measure(self.template, self.tokenizer, msgs, self.context, self.max_new_tokens)

    def to_send(self, regenerate: bool = False, draft: bool = True) -> list:
        """The conversation to answer now; when it would not fit the context, the user sees which oldest turns
        would be left out and chooses (UsageError when they choose to stop). Nothing is cut without asking, and
        nothing else changes until ``sent``."""
        messages = self.next_messages(regenerate, draft)
        fit = self.fit(messages)
        if fit is None or fit.fits:
            return messages
        kept, dropped = chat.drop_oldest(self.template, self.tokenizer, messages, fit.context, self.max_new_tokens)
        if not self.ask_drop(fit, dropped):
            raise UsageError(fit.describe() + " Nothing was sent; shorten the conversation or drop turns.")
        self.drop(dropped)
        return list(kept)

    def ask_drop(self, fit: chat.Fit, dropped) -> bool:
        """Ask whether to leave out the oldest turns (listed) or stop."""
        box = QMessageBox(QMessageBox.Icon.Warning, "The conversation is too long",
                          fit.describe() + f"\n\nTo fit, the {len(dropped)} oldest messages would be left out "
                          "(listed under Show Details).", parent=self)
        box.setDetailedText("\n\n".join(f"{m.role}: {m.content}" for m in dropped))
        drop = box.addButton(f"Drop {len(dropped)} oldest", QMessageBox.ButtonRole.AcceptRole)
        box.addButton("Stop", QMessageBox.ButtonRole.RejectRole)
        box.exec()
        return box.clickedButton() is drop

    def show_recipe(self, recipe: dict) -> None:
        """A chat recipe from history: its conversation and its answer, ready to continue."""
        messages = chat.parse_messages(recipe.get("messages") or [], need_user_last=False)
        answer = [chat.Message("assistant", recipe["text"])] if recipe.get("text") is not None else []
        self.set_conversation(list(messages) + answer)

    def drop(self, dropped) -> None:
        """Leave out turns (the oldest, after the user agreed): each dropped message removes its block."""
        for m in dropped:
            block = next((t for t in self.turns if t.role == m.role and t.content == m.content), None)
            if block is not None:
                self._remove(block)
        self.update_meter()

    def _add(self, message: chat.Message) -> TurnBlock:
        block = TurnBlock(message)
        block.copy_clicked.connect(self.copy_turn)
        block.continue_clicked.connect(self.continue_from)
        self.turn_layout.insertWidget(self.turn_layout.count() - 1, block)
        self.turns.append(block)
        QTimer.singleShot(0, self.scroll, self._scroll_to_end)  # (not after the view is gone: Qt drops it then)
        return block

    def _scroll_to_end(self) -> None:
        bar = self.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())

    def _remove(self, block: TurnBlock) -> None:
        self.turns.remove(block)
        self.turn_layout.removeWidget(block)
        block.deleteLater()

    def set_conversation(self, messages) -> None:
        """Show a conversation (from history): a system message goes to the system prompt field."""
        self.clear()
        for m in messages:
            if m.role == "system" and not self.turns:
                self.system.setPlainText(m.content)
            else:
                self._add(m)
        self.update_meter()

    def state(self) -> dict:
        """What the window keeps across a restart: the system prompt, the turns and the unsent message."""
        return {"system": self.system.toPlainText(), "input": self.input.toPlainText(),
                "turns": [[t.role, t.content] for t in self.turns if t is not self.answer]}

    def restore(self, saved) -> None:
        """The ``state`` of an earlier session (anything malformed in it is passed over)."""
        if not isinstance(saved, dict):
            return
        turns = saved.get("turns") if isinstance(saved.get("turns"), list) else []
        messages = [chat.Message(t[0], t[1]) for t in turns if isinstance(t, list) and len(t) == 2
                    and t[0] in ("user", "assistant") and isinstance(t[1], str)]
        self.set_conversation(messages)
        for field, widget in (("system", self.system), ("input", self.input)):
            if isinstance(saved.get(field), str):
                widget.setPlainText(saved[field])
        self.update_meter()

    def clear(self) -> None:
        for block in list(self.turns):
            self._remove(block)
        self.answer = None
        self.system.clear()
        self.update_meter()

    def copy_turn(self, block: TurnBlock) -> None:
        QApplication.clipboard().setText(block.content)

    def continue_from(self, block: TurnBlock) -> None:
        """An edited turn is kept; the turns after it are left out; after a user turn the model answers."""
        if self.answer is not None:
            return
        block.end_edit()
        for later in self.turns[self.turns.index(block) + 1:]:
            self._remove(later)
        self.update_meter()
        if block.role == "user":
            self.continue_requested.emit()  # (a message being written in the box stays there)

    # ----- an answer -------------------------------------------------------------------------
    def sent(self, messages: list, regenerate: bool = False) -> None:
        """``messages`` (from ``to_send``) went into the queue: the message box becomes a user turn at once (a
        message typed while it waits is the next one), or the answer being regenerated goes."""
        if regenerate:
            self.regenerated = self.turns[-1].content if self.turns else None  # back if the new one fails
            self.drop_last_answer()
        elif messages and self.input.toPlainText() == messages[-1].content:
            self._add(messages[-1])
            self.pending_user = messages[-1].content
            self.input.clear()
        self.update_meter()

    def shows_no_other(self, messages) -> bool:
        """Whether showing the conversation ``messages`` (a job's) would replace nothing but itself: the view is
        empty or already holds it (restored after a restart)."""
        try:
            sent = chat.parse_messages(messages or [], need_user_last=False)
        except StudioError:
            return True  # (begin_answer refuses it, and the job fails)
        shown = [(m.role, m.content) for m in self.messages()]
        return not shown or shown == [(m.role, m.content) for m in sent]

    def adopt(self, messages) -> bool:
        """Whether a queued chat job (``messages``, as it holds them) is the message this view shows as sent and
        unanswered (after a restart): if so, it is the pending message again (a cancel gives it back to the box)."""
        try:
            sent = chat.parse_messages(messages or [], need_user_last=True)
        except StudioError:
            return False
        if not self.turns or [(m.role, m.content) for m in self.messages()] != [(m.role, m.content) for m in sent]:
            return False
        self.pending_user = sent[-1].content
        return True

    def begin_answer(self, messages: Optional[list] = None) -> None:
        """An empty model turn starts streaming, below the conversation the job sends (``messages``, as the job
        holds them): a job queued before a restart shows its conversation again."""
        if messages is not None:
            sent = chat.parse_messages(messages, need_user_last=False)
            if [(m.role, m.content) for m in self.messages()] != [(m.role, m.content) for m in sent]:
                self.set_conversation(sent)
                self.pending_user = None
                if sent and sent[-1].role == "user" and self.input.toPlainText() == sent[-1].content:
                    self.input.clear()  # (a retried message that had come back into the box is sent now)
        self.answer = self._add(chat.Message("assistant", ""))
        self.set_busy(True)

    def append_text(self, text: str) -> None:
        if self.answer is not None:
            self.answer.set_content(self.answer.content + text)

    def finish_answer(self, text: str) -> None:
        if self.answer is not None:
            self.answer.set_content(text)
        self.answer, self.pending_user, self.regenerated = None, None, None
        self.set_busy(False)
        self.update_meter()

    def abort_answer(self) -> None:
        """A failed or cancelled answer: its block goes, the message goes back into the box (nothing is lost)."""
        if self.answer is not None:
            self._remove(self.answer)
        if self.pending_user is not None and self.turns and self.turns[-1].content == self.pending_user and \
                not self.input.toPlainText().strip():  # (a message typed meanwhile stays; the turn stays too)
            self._remove(self.turns[-1])
            self.input.setPlainText(self.pending_user)
        if self.regenerated is not None:  # a cancelled or failed Regenerate: the answer it replaced comes back
            self._add(chat.Message("assistant", self.regenerated))
        self.answer, self.pending_user, self.regenerated = None, None, None
        self.set_busy(False)
        self.update_meter()

    def drop_last_answer(self) -> None:
        if not self.turns or self.turns[-1].role != "assistant":
            raise UsageError("There is no answer to regenerate yet.")
        self._remove(self.turns[-1])

    def set_busy(self, busy: bool) -> None:
        for w in (self.send_button, self.regenerate_button, self.new_button):
            w.setEnabled(not busy)
        for t in self.turns:
            t.edit_button.setEnabled(not busy)

    # ----- the meter -------------------------------------------------------------------------
    def update_meter(self) -> None:
        """Count the conversation and the message box: at once when short or counted before, else in the meter's
        thread (a long conversation takes a good part of a second to tokenize; typing must not wait for it)."""
        self.count_number += 1
        if self.template is None or self.tokenizer is None or not self.context:
            self.meter.setRange(0, 1)
            self.meter.setValue(0)
            self.meter.setFormat("context: no model")
            self.meter_label.setText("")
            return
        msgs = self.messages()
        if self.input.toPlainText().strip():
            msgs.append(chat.Message("user", self.input.toPlainText()))
        try:
            text = self.template.render(msgs, add_generation_prompt=True) if msgs else ""
        except StudioError as exc:
            self.meter_label.setText(str(exc))
            return
        tokens = 0 if not msgs else self.tokenizer.known(text)
        if tokens is None and len(text) <= INLINE_CHARS:
            tokens = self.tokenizer.count(text)
        for earlier in (self.counting[1] if self.counting else None, self.ahead):
            if earlier is not None:
                earlier.cancel()  # (not started yet: it is not counted at all)
        self.counting = self.ahead = None
        if tokens is not None:
            self.show_count(tokens)
        else:
            self.meter.setFormat("counting…")
            self.counting = (self.count_number, self.counter.submit(self.tokenizer.count, text))
            self.count_poll.start()
        if len(text) > INLINE_CHARS and (tokens is None or tokens > chat.budget(self.context, self.max_new_tokens)):
            self.ahead = self.counter.submit(_drop_ahead, self.tokenizer, self.template, text, msgs, self.context,
                                             self.max_new_tokens)

    def poll_count(self) -> None:
        if self.counting is None:
            self.count_poll.stop()
            return
        if not self.counting[1].done():
            return
        (number, future), self.counting = self.counting, None
        self.count_poll.stop()
        if number != self.count_number or future.cancelled():
            return  # a newer count was asked for meanwhile
        try:
            tokens = future.result()
        except Exception as exc:  # noqa: BLE001 - said under the meter; the conversation is counted again at Send
            log.exception("counting the conversation failed")
            self.meter_label.setText(f"The conversation could not be counted: {exc}")
            return
        self.show_count(tokens)

    def show_count(self, tokens: int) -> None:
        fit = chat.Fit(tokens, self.context, chat.budget(self.context, self.max_new_tokens))
        self.meter.setRange(0, self.context)
        self.meter.setValue(min(fit.tokens, self.context))
        self.meter.setFormat(f"{fit.tokens} / {self.context} tokens")
        if fit.fits:
            self.meter_label.setText(f"{fit.budget - fit.tokens} tokens left before the answer's room "
                                     f"({self.context - fit.budget} kept for it)")
            self.meter_label.setStyleSheet("")
        else:
            self.meter_label.setText(f"Over by {fit.tokens - fit.budget} tokens: the oldest turns would have to be "
                                     "left out (you will be asked first).")
            self.meter_label.setStyleSheet("color: #b00020;")


def _drop_ahead(memo: chat.TokenMemo, template: chat.ChatTemplate, text: str, messages: list, context: int,
                max_new_tokens: int) -> None:
    """After the meter's count, in its thread (it sees no widget): when the conversation is over the budget, the
    turns Send would leave out are worked out, so that their counts are remembered and Send does not count them
    again on the window's thread."""
    if memo.count(text) > chat.budget(context, max_new_tokens):
        try:
            chat.drop_oldest(template, memo, messages, context, max_new_tokens)
        except StudioError:
            pass  # (Send says so)
