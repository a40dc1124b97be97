"""Chat in the window with the built-in model: three turns, regenerate, edit turn 1 and continue, reopen from
history; the context meter and the overflow warning at the edge (one token under, one over)."""
from gui_helpers import wait_idle
from engine import chat


def _window(qtbot):
    from studio.gui.main_window import MainWindow

    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.select_generator("chat")
    w.panel.form.set_values({"max_new_tokens": 24})
    w.panel.seed.setText("5")
    return w


def _send(qtbot, w, text):
    w.chat.input.setPlainText(text)
    w.chat.send_button.click()
    assert w.is_busy()
    wait_idle(qtbot, w, timeout=60000)
    assert not w.banner.isVisible()


def _roles(w):
    return [t.role for t in w.chat.turns]


def test_three_turns_regenerate_edit_and_reopen(qtbot):
    w = _window(qtbot)
    assert w.tabs.currentWidget() is w.chat and w.chat.template is not None and not w.chat.note.isVisible()
    w.chat.system.setPlainText("A street in Verona.")
    for line in ("Who goes there?", "Speak, I pray thee.", "What news from Mantua?"):
        _send(qtbot, w, line)
    assert _roles(w) == ["user", "assistant"] * 3
    answers = [t.content for t in w.chat.turns if t.role == "assistant"]
    assert all(answers) and w.chat.input.toPlainText() == ""
    assert w.output.recipe["generator"] == "chat"
    assert w.output.recipe["messages"][0] == {"role": "system", "content": "A street in Verona."}
    assert w.output.recipe["info"]["reused_tokens"] > 0  # earlier turns came from the cache

    w.panel.seed.setText("6")  # regenerate the last answer with another seed
    w.chat.regenerate_button.click()
    wait_idle(qtbot, w, timeout=60000)
    assert _roles(w) == ["user", "assistant"] * 3
    assert w.output.recipe["messages"][-1]["content"] == "What news from Mantua?"

    first = w.chat.turns[0]  # edit turn 1 and continue from there
    first.edit_button.click()
    assert first.editing
    first.editor.setPlainText("Good morrow, cousin.")
    w.chat.input.setPlainText("a draft being written")  # (it was sent too, as a second user turn)
    first.edit_button.click()  # "Continue from here"
    wait_idle(qtbot, w, timeout=60000)
    assert _roles(w) == ["user", "assistant"]
    assert w.chat.turns[0].content == "Good morrow, cousin."
    assert [m["content"] for m in w.output.recipe["messages"]] == ["A street in Verona.", "Good morrow, cousin."]
    assert w.chat.input.toPlainText() == "a draft being written"
    _send(qtbot, w, "And what of Romeo?")
    final = [(m.role, m.content) for m in w.chat.messages()]
    assert len(final) == 5

    w.chat.clear()  # reopen the conversation from history
    w.history.refresh()
    entry = w.session.history.list(limit=1)[0]
    w.open_entry(entry)
    assert [(m.role, m.content) for m in w.chat.messages()] == final
    w.chat.turns[1].copy_button.click()
    from PySide6.QtWidgets import QApplication
    assert QApplication.clipboard().text() == final[2][1]


def test_meter_and_overflow_warning_at_the_edge(qtbot, monkeypatch):
    w = _window(qtbot)
    w.panel.form.set_values({"max_new_tokens": 8})
    qtbot.waitUntil(lambda: w.chat.max_new_tokens == 8)
    w.chat.set_conversation([chat.Message("user", "Good morrow, sweet lord. " * 8),
                             chat.Message("assistant", "Fair cousin, " * 8)])
    budget = chat.budget(w.chat.context, 8)
    # find a message whose conversation is exactly one token under the budget, then one over
    words, fits_at = "", {}
    for i in range(400):
        words += "ay "
        w.chat.input.setPlainText(words)
        n = w.chat.fit().tokens
        fits_at.setdefault(n, words)
        if n > budget:
            break
    under, over = fits_at.get(budget - 1), fits_at.get(budget + 1)
    assert under and over, sorted(fits_at)

    w.chat.input.setPlainText(under)  # the meter follows typing
    qtbot.waitUntil(lambda: w.chat.meter.value() == budget - 1)
    assert "1 tokens left" in w.chat.meter_label.text()
    w.chat.input.setPlainText(over)
    qtbot.waitUntil(lambda: w.chat.meter.value() == budget + 1)
    assert "Over by 1" in w.chat.meter_label.text()

    asked = []
    monkeypatch.setattr(w.chat, "ask_drop", lambda fit, dropped: asked.append((fit, dropped)) or False)
    w.chat.send_button.click()  # over by one: asked first, "Stop" sends nothing and keeps everything
    assert len(asked) == 1 and not w.is_busy()
    assert [m.role for m in asked[0][1]] == ["user", "assistant"]
    assert len(w.chat.turns) == 2 and w.chat.input.toPlainText() == over
    assert w.banner.isVisible()

    w.chat.input.setPlainText(under)  # one under: no question
    w.chat.send_button.click()
    assert len(asked) == 1 and w.is_busy()
    wait_idle(qtbot, w, timeout=60000)
    assert len(w.chat.turns) == 4

    monkeypatch.setattr(w.chat, "ask_drop", lambda fit, dropped: asked.append((fit, dropped)) or True)
    w.chat.input.setPlainText("Speak again.")  # over now: the oldest turns are dropped, shown and asked about
    w.chat.send_button.click()
    assert len(asked) == 2
    wait_idle(qtbot, w, timeout=60000)
    sent = w.output.recipe["messages"]
    assert sent[-1]["content"] == "Speak again." and len(sent) < 5
    assert all(m["content"] != "Good morrow, sweet lord. " * 8 for m in sent)
    assert w.chat.fit(w.chat.messages()[:-1]).fits


def test_model_without_template_says_so_in_the_window(qtbot, studio_home):
    import shutil

    from engine.store import BUILTIN_DIR

    folder = studio_home / "models" / "plain-llama"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    (folder / "tokenizer_config.json").unlink()
    w = _window(qtbot)
    assert not w.chat.note.isVisible()
    w.panel.model.setCurrentIndex(w.panel.model.findData("plain-llama"))
    assert w.chat.template.fallback and w.chat.note.isVisible() and "no chat template" in w.chat.note.text()
    w.chat.input.setPlainText("Hello")
    w.chat.update_meter()
    assert w.chat.meter.value() > 0


def test_turns_and_messages_show_text_as_it_is(qtbot):
    """A message holding <img src="/dev/zero"> was rendered as HTML: Qt read /dev/zero on the window's thread until
    memory ran out. Every label that shows a user's, a model's or a plugin's words shows them as plain text."""
    from PySide6.QtCore import Qt

    from studio.gui.chat_view import TurnBlock
    from studio.gui.error_banner import ErrorBanner
    from studio.gui.output_view import OutputView

    html = '<img src="/dev/zero"> <b>hi</b>'
    turn = TurnBlock(chat.Message("user", html))
    banner, view = ErrorBanner(), OutputView()
    qtbot.addWidget(turn), qtbot.addWidget(banner), qtbot.addWidget(view)
    banner.show_message(html)
    for label in (turn.text, banner.label, view.caption_text, view.info):
        assert label.textFormat() == Qt.TextFormat.PlainText
    assert turn.text.text() == html and html in banner.label.text()
    turn.show()
    qtbot.wait(50)  # painted without reading the file


def test_a_second_message_while_the_model_answers_waits_for_the_answer(qtbot):
    """Sending again while an answer streamed queued the second message without the answer before it (the recipe
    held two user messages in a row, and the view no longer matched what the model was sent)."""
    w = _window(qtbot)
    w.chat.input.setPlainText("Who goes there?")
    w.chat.send_button.click()
    w.chat.input.setPlainText("Speak, I pray thee.")
    w.generate()  # Ctrl+Return while the first answer is on its way
    assert w.banner.isVisible() and "still answering" in w.banner.label.text()
    assert w.chat.input.toPlainText() == "Speak, I pray thee."  # nothing is lost
    wait_idle(qtbot, w, timeout=60000)
    _send(qtbot, w, "Speak, I pray thee.")
    assert _roles(w) == ["user", "assistant"] * 2
    assert [m["role"] for m in w.output.recipe["messages"]] == ["user", "assistant", "user"]


def test_a_chat_message_queued_behind_another_job_shows_what_was_sent(qtbot):
    """The user's turn was taken from the message box when the job started, not when it was sent: text typed
    meanwhile showed as the question while the model answered the first one."""
    w = _window(qtbot)
    w.select_generator("text")
    w.panel.prompt.setPlainText("ROMEO:")
    w.panel.form.set_values({"max_new_tokens": 120})
    w.generate()
    assert w.is_busy()
    w.select_generator("chat")
    w.chat.input.setPlainText("Hello there")
    w.chat.send_button.click()
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "Hello there")]  # in the view at once
    w.chat.input.setPlainText("A different message typed later")
    wait_idle(qtbot, w, timeout=120000)
    qtbot.waitUntil(lambda: w.output.recipe and w.output.recipe["generator"] == "chat", timeout=120000)
    wait_idle(qtbot, w, timeout=120000)
    assert [(t.role, t.content) for t in w.chat.turns][0] == ("user", "Hello there")
    assert _roles(w) == ["user", "assistant"]
    assert w.output.recipe["messages"] == [{"role": "user", "content": "Hello there"}]
    assert w.chat.input.toPlainText() == "A different message typed later"


def test_regenerate_that_stops_at_the_too_long_question_keeps_the_answer(qtbot, monkeypatch):
    w = _window(qtbot)
    w.chat.set_conversation([chat.Message("user", "Good morrow, sweet lord. " * 200),
                             chat.Message("assistant", "THE PRECIOUS LAST ANSWER")])
    monkeypatch.setattr(w.chat, "ask_drop", lambda fit, dropped: False)
    w.chat.regenerate_button.click()
    assert not w.is_busy() and w.banner.isVisible()
    assert w.chat.turns[-1].content == "THE PRECIOUS LAST ANSWER"


def test_the_conversation_is_kept_across_a_restart(qtbot):
    from studio.gui.main_window import MainWindow

    w = _window(qtbot)
    w.chat.system.setPlainText("A street in Verona.")
    _send(qtbot, w, "Who goes there?")
    w.chat.input.setPlainText("half a reply")
    kept = [(t.role, t.content) for t in w.chat.turns]
    w.close()
    again = MainWindow()
    qtbot.addWidget(again)
    assert [(t.role, t.content) for t in again.chat.turns] == kept
    assert again.chat.system.toPlainText() == "A street in Verona."
    assert again.chat.input.toPlainText() == "half a reply"


def test_a_chat_job_left_in_the_queue_shows_its_conversation_when_it_runs(qtbot):
    """Closed while the model answered: the job is queued again and runs when the window opens; the view showed
    the answer under no question (the message was in neither the conversation nor the box)."""
    from engine.jobqueue import JobQueue
    from engine.runner import Job
    from studio.gui.main_window import MainWindow

    JobQueue().submit(Job("chat", messages=[{"role": "user", "content": "Tell me of Verona"}], seed=1,
                          options={"max_new_tokens": 8}), source="gui")
    w = MainWindow()
    qtbot.addWidget(w)
    qtbot.waitUntil(lambda: w.is_busy(), timeout=10000)
    wait_idle(qtbot, w, timeout=60000)
    assert [(t.role, t.content) for t in w.chat.turns][0] == ("user", "Tell me of Verona")
    assert _roles(w) == ["user", "assistant"] and w.chat.turns[1].content


def test_chat_jobs_from_elsewhere_leave_the_conversation_and_bad_ones_fail(qtbot):
    """A chat job queued from the CLI replaced the window's conversation with its own; one whose messages the view
    could not show stayed 'running' for ever."""
    from engine.jobqueue import JobQueue
    from engine.runner import Job
    from studio.gui.main_window import MainWindow

    queue = JobQueue()
    bad = queue.submit(Job("gui-less", messages=[{"role": "robot", "content": "hi"}]), source="gui")
    queue.submit(Job("chat", messages=[{"role": "robot", "content": "hi"}], seed=1), source="gui")
    w = MainWindow()
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: all(j.state in ("failed", "done") for j in w.queue.list()), timeout=20000)
    assert [j.state for j in w.queue.list()] == ["failed", "failed"] and queue.get(bad).error
    w.select_generator("chat")
    w.chat.set_conversation([chat.Message("user", "mine"), chat.Message("assistant", "my answer")])
    other = w.queue.submit(Job("chat", messages=[{"role": "user", "content": "from the CLI"}], seed=1,
                               options={"max_new_tokens": 2}), source="cli")
    w.pump()
    qtbot.waitUntil(lambda: w.queue.get(other).state == "done", timeout=60000)
    wait_idle(qtbot, w, timeout=60000)
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "mine"), ("assistant", "my answer")]


def test_a_cancelled_regenerate_brings_the_answer_back_and_the_message_box_has_a_paste_limit(qtbot):
    from PySide6.QtCore import QMimeData

    w = _window(qtbot)
    w.panel.form.set_values({"max_new_tokens": 200})
    w.chat.set_conversation([chat.Message("user", "Who goes there?"), chat.Message("assistant", "THE ANSWER")])
    w.chat.regenerate_button.click()
    assert w.is_busy()
    w.cancel()
    wait_idle(qtbot, w, timeout=60000)
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "Who goes there?"), ("assistant", "THE ANSWER")]
    big = QMimeData()
    big.setText("x" * 300_000)
    w.chat.input.insertFromMimeData(big)  # a 300,000-character line froze the window for seconds
    assert w.chat.input.toPlainText() == "" and "a message holds at most 100,000" in w.banner.message()


def test_another_windows_chat_job_does_not_replace_this_conversation(qtbot):
    """A second window on the same state folder took the first one's queued chat job and replaced its own
    conversation with it."""
    from engine.jobqueue import JobQueue
    from engine.runner import Job

    w = _window(qtbot)
    w.chat.set_conversation([chat.Message("user", "mine"), chat.Message("assistant", "my answer")])
    theirs = JobQueue().submit(Job("chat", messages=[{"role": "user", "content": "the other window's"}], seed=1,
                                   options={"max_new_tokens": 2}), source="gui")
    w.pump()
    qtbot.waitUntil(lambda: w.queue.get(theirs).state == "done", timeout=60000)
    wait_idle(qtbot, w, timeout=60000)
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "mine"), ("assistant", "my answer")]


def test_the_meter_counts_a_long_conversation_off_the_windows_thread(qtbot, monkeypatch):
    """80 long turns took ~0.3-3.7 s to tokenize on every keystroke (by tokenizer), on the window's thread: a long
    conversation is counted in the meter's thread now, once (Send uses that count), and a count that arrives after
    a newer one was asked for is not shown."""
    import threading
    from types import SimpleNamespace

    from engine import state
    from engine.configs import read_json
    from studio.gui.chat_view import INLINE_CHARS, ChatView

    folder = state.BUILTIN_MODELS / "shakespeare-llama"
    view = ChatView()
    qtbot.addWidget(view)
    view.set_model(SimpleNamespace(path=folder, name="shakespeare-llama", config=read_json(folder / "config.json")),
                   8)
    view.context = 10 ** 7
    threads = []
    real = chat.encode
    monkeypatch.setattr(chat, "encode", lambda tok, text: threads.append(threading.current_thread()) or
                        real(tok, text))
    turn = "Good morrow, sweet lord. " * (INLINE_CHARS // 40)
    view.set_conversation([chat.Message("user" if i % 2 == 0 else "assistant", f"{i} {turn}") for i in range(4)])
    view.input.setPlainText("and now?")
    view.update_meter()
    want = len(real(view.tokenizer.tokenizer, view.template.render(view.next_messages())))
    qtbot.waitUntil(lambda: view.meter.value() == want, timeout=10000)
    assert threads and threading.main_thread() not in threads
    assert view.meter.format() == f"{want} / {10 ** 7} tokens"
    threads.clear()
    assert view.fit().tokens == want and not threads  # Send counts nothing again

    from concurrent.futures import Future

    late = Future()
    late.set_result(5)
    view.counting = (view.count_number - 1, late)  # a late count of an older conversation
    view.poll_count()
    assert view.meter.value() == want and view.counting is None

    view.context = want // 2 + 8  # over the budget: the meter's thread works out which turns Send leaves out
    view.update_meter()
    assert view.ahead is not None
    view.ahead.result(timeout=30)
    threads.clear()
    view.ask_drop = lambda fit, dropped: True
    kept = view.to_send()
    assert len(kept) < 5 and kept[-1].content == "and now?"
    assert threading.main_thread() not in threads  # Send counted nothing on the window's thread


def test_a_chat_job_cancelled_before_it_starts_gives_back_the_message_and_the_answer(qtbot):
    """A queued Regenerate cancelled from the Queue tab (or a terminal) lost the answer it was to replace, and a
    queued message cancelled there stayed in the conversation with no answer and no way to send it again."""
    from engine.jobqueue import JobQueue

    w = _window(qtbot)
    w.chat.set_conversation([chat.Message("user", "Who goes there?"), chat.Message("assistant", "THE ANSWER")])
    w.queue.set_paused(True)
    w.chat.regenerate_button.click()
    assert _roles(w) == ["user"] and not w.is_busy()  # queued: the answer it replaces is out of the view
    w.queue.cancel(w.chat_job)
    w.on_queue_changed()  # (what the Queue tab's Cancel calls)
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "Who goes there?"), ("assistant", "THE ANSWER")]

    w.chat.input.setPlainText("And who are you?")
    w.chat.send_button.click()
    assert _roles(w) == ["user", "assistant", "user"] and w.chat.input.toPlainText() == ""
    JobQueue().cancel(w.chat_job)  # from a terminal: the Queue tab's timer notices
    qtbot.waitUntil(lambda: _roles(w) == ["user", "assistant"], timeout=5000)
    assert w.chat.input.toPlainText() == "And who are you?"


def test_a_cancelled_chat_job_retried_later_and_one_queued_before_a_restart(qtbot):
    """Retrying an old cancelled chat job replaced the conversation on screen with the old one; a message queued
    before the window closed and cancelled after it reopened stayed as a turn with no answer."""
    from engine.jobqueue import JobQueue

    w = _window(qtbot)
    w.queue.set_paused(True)
    w.chat.input.setPlainText("Old question")
    w.chat.send_button.click()
    old = w.chat_job
    JobQueue().cancel(old)
    w.check_chat_job()
    assert w.chat.input.toPlainText() == "Old question" and not w.chat.turns
    w.chat.clear()
    w.chat.input.clear()
    w.chat.set_conversation([chat.Message("user", "New topic"), chat.Message("assistant", "Aye")])
    w.queue.retry(old)
    w.queue.set_paused(False)
    w.pump()
    qtbot.waitUntil(lambda: w.queue.get(old).state == "done", timeout=60000)
    wait_idle(qtbot, w, timeout=60000)
    assert [(t.role, t.content) for t in w.chat.turns] == [("user", "New topic"), ("assistant", "Aye")]

    w.queue.set_paused(True)
    w.chat.input.setPlainText("Sent before closing")
    w.chat.send_button.click()
    queued = w.chat_job
    w.close()
    again = _window(qtbot)
    assert again.chat_job == queued and again.chat.turns[-1].content == "Sent before closing"
    JobQueue().cancel(queued)
    again.check_chat_job()
    assert again.chat.input.toPlainText() == "Sent before closing" and _roles(again) == ["user", "assistant"]


def test_a_very_long_turn_shows_its_beginning_and_copy_and_edit_have_it_all(qtbot):
    """40 turns of 90,000 characters (pasted, or opened from history) froze the window for 8 s while Qt laid out
    the labels, at every start (the conversation is restored)."""
    from PySide6.QtWidgets import QApplication

    from studio.gui.chat_view import SHOWN_CHARS, ChatView

    view = ChatView()
    qtbot.addWidget(view)
    long = "Fair cousin, thou art welcome to Verona. " * 2500
    view.set_conversation([chat.Message("user", long), chat.Message("assistant", "short")])
    block = view.turns[0]
    assert len(block.text.text()) < SHOWN_CHARS + 200 and "more characters" in block.text.text()
    assert block.content == long and view.messages()[0].content == long and view.state()["turns"][0][1] == long
    block.copy_button.click()
    assert QApplication.clipboard().text() == long
    block.edit_button.click()
    assert block.editor.toPlainText() == long
    assert view.turns[1].text.text() == "short"
