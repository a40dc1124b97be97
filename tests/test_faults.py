"""The fault-injection suite (docs/reliability.md): the real CLI under faults, then the invariants (tests/faults.py).

The default sweep runs in CI; STUDIO_FAULT_SWEEP=1 runs the heavier sweep (every kill point with and without
--out, both plugin generators and the built-in text model, a full disk at many sizes, more concurrency) and
prints its figures.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time

import pytest

import faults as F
from plugin_samples import GOOD, PIXELS, drop

HEAVY = os.environ.get("STUDIO_FAULT_SWEEP") == "1"
TALLY = F.Tally()
GENS = [("upper", ".txt"), ("pixels", ".png")] + ([("text", ".txt")] if HEAVY else [])


@pytest.fixture
def home(studio_home):
    drop(studio_home, "good", GOOD)
    drop(studio_home, "pixels", PIXELS)
    r = F.studio("generators", "--json")  # the plugin check once, before the faults
    assert r.rc == 0, r.stderr
    return studio_home


def gen(generator: str, *extra, fault: str = "", fsize: int = 0, seed: int = 42, prompt: str = "a fox"):
    return F.studio("generate", generator, "--prompt", prompt, "--seed", str(seed), *extra, fault=fault,
                    fsize=fsize)


def _prefill(out):
    """Files the user already has in the output folder: none of them may change."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.json").write_text('{"mine": true}')
    (out / "keep.txt").write_text("mine")
    return F.snapshot(out)


KILL_GENS = GENS if HEAVY else GENS[:1]


@pytest.mark.parametrize("generator,ext", KILL_GENS)
@pytest.mark.parametrize("named", [False, True] if HEAVY else [False])
def test_kill_at_each_step(home, tmp_path, generator, ext, named):
    out = tmp_path / "out"
    before = _prefill(out)
    where = ("--out", str(out / f"notes{ext}"), "--overwrite") if named else ("--out", f"{out}/")
    mine = (where[1], str(F.Path(where[1]).resolve()) + ".json")
    for point in F.KILL_POINTS:
        r = gen(generator, *where, fault=f"{point}:kill")
        TALLY.fault(f"SIGKILL at {point}")
        assert r.rc == -9
        F.check(TALLY, home, out, before, [r], named=mine)
        if HEAVY:  # the next one works normally
            again = gen(generator, *where)
            assert again.rc == 0, again.stderr
            F.check(TALLY, home, out, before, [again], named=mine)
            before = F.snapshot(out)


@pytest.mark.parametrize("generator,ext", KILL_GENS)
def test_full_disk_at_a_step(home, tmp_path, generator, ext):
    out = tmp_path / "out"
    before = _prefill(out)
    for point in ["tmp", "link"] if not HEAVY else ["pending", "tmp", "link", "done"]:
        r = gen(generator, "--out", f"{out}/", fault=f"{point}:enospc")
        TALLY.fault(f"ENOSPC at {point}")
        if point == "pending":  # the history could not be written: the output is saved and named in a warning
            assert r.rc == 1 and "not recorded in the history" in r.stderr, r.stderr
        else:
            assert r.rc == 1 and "disk is full" in r.stderr and "Nothing was saved" in r.stderr, r.stderr
        if generator != "pixels":
            assert "A FOX" in r.stdout or generator == "text"  # the text is shown even when it was not saved
        F.check(TALLY, home, out, before, [r])
        before = F.snapshot(out)  # what this run saved (and named) is the user's now


def test_real_full_disk(home, tmp_path):
    """RLIMIT_FSIZE: every write past the limit fails (EFBIG), wherever it falls, the database included."""
    out = tmp_path / "out"
    before = _prefill(out)
    runs = []
    for limit in [1, 700] if not HEAVY else [1, 100, 300, 500, 700, 900, 1200, 2000, 4000, 9000]:
        for g, _ in GENS:
            runs.append(gen(g, "--out", f"{out}/", fsize=limit))
            TALLY.fault("file size limit")
            assert runs[-1].rc in (0, 1), runs[-1].stderr
            assert runs[-1].rc == 0 or "full" in runs[-1].stderr, runs[-1].stderr
    F.check(TALLY, home, out, before, runs)


def test_busy_database(home, tmp_path):
    out = tmp_path / "out"
    before = _prefill(out)
    r = gen("upper", "--out", f"{out}/", fault="pending:locked")
    TALLY.fault("busy database")
    assert r.rc == 1 and "A FOX" in r.stdout and "not recorded in the history" in r.stderr, r.stderr
    F.check(TALLY, home, out, before, [r])


def test_really_locked_database(home, tmp_path, monkeypatch):
    """Another process holds a write transaction: the command waits, then saves the file and says it is busy,
    never that the database should be moved aside."""
    monkeypatch.setenv("STUDIO_HISTORY_TIMEOUT", "0.5")
    out = tmp_path / "out"
    before = _prefill(out)
    F.studio("history", "list")
    conn = sqlite3.connect(home / "history.sqlite3", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        r = gen("upper", "--out", f"{out}/")
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    TALLY.fault("locked database")
    assert r.rc == 1 and "busy" in r.stderr and "rename" not in r.stderr and "A FOX" in r.stdout, r.stderr
    F.check(TALLY, home, out, before, [r])


def test_damaged_database(home, tmp_path):
    out = tmp_path / "out"
    before = _prefill(out)
    (home / "history.sqlite3").write_bytes(b"this is not a database" * 100)
    r = gen("upper", "--out", f"{out}/")
    TALLY.fault("damaged database")
    assert r.rc == 1 and "A FOX" in r.stdout and "damaged" in r.stderr, r.stderr
    listing = F.studio("history", "list")
    assert listing.rc == 1 and "damaged" in listing.stderr and "Traceback" not in listing.stderr
    TALLY.checks += 1
    (home / "history.sqlite3").unlink()
    F.check(TALLY, home, out, before, [r])


@pytest.mark.parametrize("generator,ext", GENS[:2] if HEAVY else GENS[1:2])
def test_concurrent_equal_seeds(home, tmp_path, generator, ext):
    """Processes started together with one seed: every output its own file, every row its own content."""
    out = tmp_path / "out"
    before = _prefill(out)
    n = 8 if HEAVY else 4
    procs = [F.start("generate", generator, "--prompt", f"prompt {i}", "--seed", "42", "--out", f"{out}/")
             for i in range(n)]
    runs = [F.Run(p.args, p.wait(120), *p.communicate()) for p in procs]
    TALLY.fault(f"{n} concurrent equal seeds")
    assert all(r.rc == 0 for r in runs), [r.stderr for r in runs]
    F.check(TALLY, home, out, before, runs)
    prompts = sorted(e[1][0]["path"] for e in F.rows(home))
    assert len(set(prompts)) == n


def test_concurrent_equal_out(home, tmp_path):
    """Processes naming the same --out: one gets the name, the others the next numbers, each said in a warning."""
    out = tmp_path / "out"
    before = _prefill(out)
    procs = [F.start("generate", "upper", "--prompt", f"prompt {i}", "--out", str(out / "same.txt"))
             for i in range(4)]
    runs = [F.Run(p.args, p.wait(120), *p.communicate()) for p in procs]
    TALLY.fault("4 concurrent equal --out")
    assert all(r.rc in (0, 2) for r in runs), [r.stderr for r in runs]
    F.check(TALLY, home, out, before, runs)


def test_existing_outputs_are_kept(home, tmp_path):
    out = tmp_path / "out"
    before = _prefill(out)
    refused = gen("upper", "--out", str(out / "keep.txt"))
    assert refused.rc == 2 and "--overwrite" in refused.stderr
    notes = gen("upper", "--out", str(out / "notes.txt"))  # its recipe goes to notes.txt.json, not notes.json
    assert notes.rc == 0 and (out / "notes.txt.json").is_file()
    newdir = gen("upper", "--out", f"{out}/newdir/")
    assert newdir.rc == 0 and (out / "newdir").is_dir()
    under_file = gen("upper", "--out", str(out / "keep.txt" / "x.txt"))
    assert under_file.rc == 2 and "is a file" in under_file.stderr, under_file.stderr
    F.check(TALLY, home, out, before, [refused, notes, newdir, under_file])
    replaced = gen("upper", "--out", str(out / "keep.txt"), "--overwrite")
    assert replaced.rc == 0 and (out / "keep.txt").read_text() == "A FOX"
    F.check(TALLY, home, out, before, [replaced], named=(str(out / "keep.txt"),))


def test_zz_report():
    """The figures of this run (the heavy sweep's go to docs/reliability.md)."""
    print(f"\nfault-injection sweep ({'heavy' if HEAVY else 'CI'}): {TALLY.faults} faults injected, "
          f"{TALLY.checks} invariant checks passed; by kind: {TALLY.kinds}")


def test_a_failed_overwrite_keeps_the_users_file(home, tmp_path):
    """--out FILE --overwrite, then the save failed at its last step (a busy or full history database): the user's
    file was already replaced, then removed with the new one; "Nothing was saved" and the old file was gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("my precious notes")
    for point in ("done:enospc", "done:locked"):
        r = gen("upper", "--out", str(out / "keep.txt"), "--overwrite", fault=point)
        assert r.rc == 1, r.stderr
        assert (out / "keep.txt").read_text() == "my precious notes"
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
