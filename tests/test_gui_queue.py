"""The window submits to the queue; the Queue tab reorders, pauses, resumes, cancels and retries."""
from engine.history import History

from gui_helpers import gui_home, make_window  # noqa: F401


def _states(w, ids):
    return [w.queue.get(i).state for i in ids]


def test_generate_queues_and_queue_tab_controls_order(qtbot, gui_home):
    w = make_window(qtbot, generator="slow")
    panel = w.queue_panel
    ids = []
    for prompt, steps in (("first", 25), ("second", 3), ("third", 3), ("fourth", 3)):
        w.panel.prompt.setPlainText(prompt)
        w.panel.form.set_values({"steps": steps})
        ids.append(w.submit())
    assert w.is_busy() and w.panel.generate_button.isEnabled()  # Generate stays available: it queues
    assert _states(w, ids) == ["running", "queued", "queued", "queued"]
    panel.refresh()
    assert panel.list.count() == 4 and "running" in panel.list.item(0).text()
    assert panel.list.queued_ids() == ids[1:]
    panel.reorder([ids[2], ids[1], ids[3]])  # what dropping "third" above "second" does
    assert [j.id for j in w.queue.list(states=("queued",))] == [ids[2], ids[1], ids[3]]
    panel.toggle_pause()
    assert w.queue.paused() and "Resume" in panel.pause_button.text()
    panel.list.setCurrentRow(3)  # the fourth job
    panel.list.currentItem().setSelected(True)
    panel.cancel_selected()
    qtbot.waitUntil(lambda: w.task is None and w.queue.get(ids[0]).state == "done", timeout=20000)
    assert _states(w, ids[1:]) == ["queued", "queued", "cancelled"]  # paused: nothing else started
    panel.toggle_pause()  # resume: the window starts the next job
    qtbot.waitUntil(lambda: _states(w, ids[1:3]) == ["done", "done"], timeout=20000)
    order = [e.prompt for e in sorted(History().list(), key=lambda e: e.id)]
    assert order == ["first", "third", "second"]
    panel._snapshot = None
    panel.refresh()
    for row in range(panel.list.count()):
        if panel.list.item(row).data(256 + 1) == ids[3]:
            panel.list.setCurrentRow(row)
            panel.list.currentItem().setSelected(True)
    panel.retry_selected()
    qtbot.waitUntil(lambda: w.queue.get(ids[3]).state == "done", timeout=20000)
    assert all(e.recipe["queue_job"] == w.queue.tag(i) for e, i in zip(sorted(History().list(), key=lambda e: e.id),
                                                                         [ids[0], ids[2], ids[1], ids[3]]))


def test_escape_cancels_running_job_and_queue_goes_on(qtbot, gui_home):
    w = make_window(qtbot, generator="slow")
    w.panel.prompt.setPlainText("long")
    w.panel.form.set_values({"steps": 200})
    a = w.submit()
    w.panel.prompt.setPlainText("short")
    w.panel.form.set_values({"steps": 2})
    b = w.submit()
    qtbot.waitUntil(lambda: w.queue.get(a).step > 0, timeout=20000)
    w.cancel()
    qtbot.waitUntil(lambda: w.queue.get(b).state == "done", timeout=20000)
    assert w.queue.get(a).state == "cancelled"
    assert [e.prompt for e in History().list()] == ["short"]


def test_a_damaged_queue_database_still_opens_the_window(qtbot, gui_home):
    (gui_home / "queue.sqlite3").write_bytes(b"SQLite format 3\0" + b"\x13garbage" * 512)
    w = make_window(qtbot, generator="slow")
    assert w.banner.isVisible() and "temporary queue" in w.banner.message()
    w.panel.prompt.setPlainText("still works")
    job_id = w.submit()
    qtbot.waitUntil(lambda: w.queue.get(job_id).state == "done", timeout=20000)
    assert (gui_home / "queue.sqlite3").read_bytes().startswith(b"SQLite format 3\0\x13garbage")  # left as it was
    temporary = w.temporary_queue
    assert temporary.is_dir()
    w.close()
    assert not temporary.exists()  # (it was left in /tmp at every start on a damaged queue)


def test_queue_rows_that_cannot_run_fail_with_a_reason_and_the_queue_goes_on(qtbot, gui_home):
    """A row whose stored job was cut short made every listing fail (JSONDecodeError) and nothing ran again; a row
    with a field this studio does not know stayed 'running' for ever (TypeError in the window)."""
    import sqlite3

    from engine.jobqueue import JobQueue
    from engine.runner import Job

    queue = JobQueue()
    cut = queue.submit(Job("slow", prompt="cut short"))
    future = queue.submit(Job("slow", prompt="from a newer studio"))
    with sqlite3.connect(queue.path) as conn:
        conn.execute("UPDATE jobs SET payload = '{\"generator\": \"slo' WHERE id = ?", (cut,))
        conn.execute("UPDATE jobs SET payload = json_set(payload, '$.future_field', 1) WHERE id = ?", (future,))
    assert [j.id for j in queue.list()] == [cut, future] and queue.get(cut).damaged
    w = make_window(qtbot, generator="slow")
    w.panel.prompt.setPlainText("after them")
    good = w.submit()
    qtbot.waitUntil(lambda: w.queue.get(good).state == "done", timeout=20000)
    assert [w.queue.get(i).state for i in (cut, future)] == ["failed", "failed"]
    assert "damaged row" in w.queue.get(cut).error and "future_field" in w.queue.get(future).error
    w.queue_panel.refresh()
    assert w.queue_panel.list.count() == 3


def test_a_queue_database_damaged_past_its_first_pages_still_opens_the_window(qtbot, gui_home):
    import sqlite3

    from engine.jobqueue import JobQueue
    from engine.runner import Job

    queue = JobQueue()
    for _ in range(50):
        queue.submit(Job("slow", prompt="x" * 500), source="cli")
    queue.close_thread()
    with sqlite3.connect(queue.path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(queue.path.read_bytes())
    data[8192::7] = b"\xab" * len(data[8192::7])  # the header opens; the rows do not read
    queue.path.write_bytes(bytes(data))
    w = make_window(qtbot, generator="slow")
    assert "temporary queue" in w.banner.message() and "is damaged" in w.banner.message()
