"""The history database as a database: schema versions and migrations, full-text search, and messages that tell
a busy database from a damaged one (issue #13)."""
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from engine import history as H
from engine.errors import StateError, UsageError

V0 = Path(__file__).resolve().parent / "data" / "history_v0" / "history.sqlite3"  # written by the first studio


def test_a_version_0_database_migrates_once_and_keeps_every_row(tmp_path):
    path = tmp_path / "history.sqlite3"
    shutil.copy(V0, path)
    before = sqlite3.connect(path).execute("SELECT count(*) FROM generations").fetchone()[0]
    h = H.History(path)
    rows = h.list(limit=100)
    assert len(rows) == before == 12
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == H.VERSION
    iso, text = conn.execute("SELECT created_iso, text FROM generations WHERE generator = 'caption'").fetchone()
    assert iso.endswith("Z") and "T" in iso and "triangle" in text
    assert H.migrate(conn) == H.VERSION  # already current: nothing to do


def test_full_text_search_over_prompts_and_generated_text(tmp_path):
    h = H.History(tmp_path / "h.sqlite3")
    h.add({"generator": "text", "prompt": "ROMEO:", "text": "But soft, what light through yonder window"}, [])
    h.add({"generator": "caption", "prompt": "", "text": "a small red circle on a blue background"}, [])
    h.add({"generator": "chat", "messages": [{"role": "user", "content": "tell me of castles"}], "text": "Stone."}, [])
    assert [e.generator for e in h.list(search="window")] == ["text"]
    assert [e.generator for e in h.list(search="red circ")] == ["caption"]  # words as prefixes, all needed
    assert [e.generator for e in h.list(search="castle")] == ["chat"]
    assert h.list(search='" OR * NEAR(') == []  # FTS syntax in a search is plain text, never an error
    entry = h.list(search="yonder")[0]
    h.delete(entry.id)
    assert h.list(search="yonder") == []


def test_a_newer_database_is_left_alone(tmp_path):
    path = tmp_path / "h.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    with pytest.raises(StateError, match="newer studio"):
        H.History(path).list()


def test_busy_and_damaged_databases_get_different_advice(tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite3"
    h = H.History(path)
    h.add({"generator": "text", "prompt": "a"}, [])
    monkeypatch.setattr(H, "BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(path)
    other.execute("BEGIN IMMEDIATE")  # another process holds a write transaction
    with pytest.raises(StateError) as busy:
        h.add({"generator": "text", "prompt": "b"}, [])
    other.rollback()
    assert "busy" in str(busy.value) and "nothing is wrong" in str(busy.value) and "rename" not in str(busy.value)
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError) as bad:
        H.History(damaged).list()
    assert "damaged" in str(bad.value) and "leaves it as it is" in str(bad.value)
    assert damaged.read_bytes().startswith(b"this is not")  # never touched


def test_ids_out_of_range_are_plain_misses(tmp_path):
    h = H.History(tmp_path / "h.sqlite3")
    for bad in (0, -1, 2 ** 70):
        with pytest.raises(UsageError, match="no generation"):
            h.get(bad)


def test_processes_opening_an_old_database_together_migrate_it_once(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "history.sqlite3"
    shutil.copy(V0, path)
    code = ("import sys; from engine.history import History; "
            "print(len(History(sys.argv[1]).list(limit=100)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].strip() for o in outs] == ["12"] * 6, [o[1][-300:] for o in outs]


def test_a_damaged_row_does_not_break_the_listing(studio_home, capsys):
    """One row whose recipe was not JSON made `history list` 'unexpected JSONDecodeError' with no rows at all;
    one whose recipe was a list made `history replay` 'unexpected AttributeError'."""
    import sqlite3

    from studio.cli import main

    for prompt in ("one", "two", "three"):
        assert main(["generate", "text", "--prompt", prompt, "--set", "max_new_tokens=2"]) == 0
    db = sqlite3.connect(studio_home / "history.sqlite3")
    db.execute("update generations set recipe='{broken' where id=2")
    db.execute("update generations set recipe='[1, 2]' where id=3")
    db.commit()
    db.close()
    capsys.readouterr()
    assert main(["history", "list"]) == 0
    listed = capsys.readouterr().out
    assert "one" in listed and "two" in listed and "three" in listed
    for row in ("2", "3"):
        assert main(["history", "replay", row]) == 2
        assert "is damaged" in capsys.readouterr().err


def test_history_list_marks_a_cut_prompt_and_names_a_captions_image(studio_home, capsys):
    """A long prompt was cut without a sign, and a caption's row showed nothing of its input."""
    from studio.cli import main

    h = H.History()
    long = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    h.add({"generator": "text", "prompt": long, "text": "x"}, [])
    h.add({"generator": "caption", "prompt": None, "image": {"path": "/pics/scene-7.png", "sha256": "ab"},
           "text": "a red circle"}, [])
    h.add({"generator": "sd", "prompt": "an oil painting", "image": {"path": "/pics/photo.jpg", "sha256": "cd"}}, [])
    h.add({"generator": "text", "prompt": "short", "text": "y"}, [])
    assert main(["history", "list"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.endswith("PROMPT / IMAGE")
    assert rows[0].endswith("  short") and rows[1].endswith("  photo.jpg: an oil painting")
    assert rows[2].endswith("  scene-7.png")
    assert rows[3].endswith("  To be, or not to be, that is the question: Whethe…")
