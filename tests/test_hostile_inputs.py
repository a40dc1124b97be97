"""Fixes from the hostile test (issue #13) that one command shows: thread counts, no display, flags as values,
plugins that print, file modes."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from plugin_samples import GOOD, drop


def studio(*args, home, env=None, drop_env=()):
    full = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0", **(env or {}))
    for name in drop_env:
        full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_huge_thread_counts_are_capped_and_junk_refused(studio_home):
    proc = studio("generate", "text", "--prompt", "A", "--set", "max_new_tokens=2", "--seed", "1", home=studio_home,
                  env={"STUDIO_TORCH_THREADS": "100000"})
    assert proc.returncode == 0 and "more than this machine's" in proc.stderr
    proc = studio("generate", "text", "--prompt", "A", home=studio_home, env={"STUDIO_TORCH_THREADS": "-3"})
    assert proc.returncode == 2 and "STUDIO_TORCH_THREADS must be a whole number" in proc.stderr


def test_no_display_is_one_clear_line(studio_home):
    if not sys.platform.startswith("linux"):
        return
    proc = studio("gui", home=studio_home, drop_env=("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"))
    assert proc.returncode == 2 and "No display was found" in proc.stderr and "QT_QPA_PLATFORM=offscreen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_global_flags_are_not_taken_out_of_values(studio_home):
    proc = studio("generate", "text", "--prompt", "--debug", home=studio_home)
    assert proc.returncode == 2 and "--option=VALUE" in proc.stderr and "Traceback" not in proc.stderr
    proc = studio("generate", "text", "--prompt=--safe-mode", "--set", "max_new_tokens=2", "--seed", "1", "--json",
                  home=studio_home)
    assert proc.returncode == 0 and json.loads(proc.stdout)["prompt"] == "--safe-mode"
    listed = studio("--safe-mode", "plugins", "list", home=studio_home)
    assert listed.returncode == 0


def test_a_plugin_that_prints_does_not_corrupt_json(studio_home):
    drop(studio_home, "chatty", "print('hello from a plugin')\n" + GOOD)
    proc = studio("generators", "--json", home=studio_home)
    assert proc.returncode == 0 and "hello from a plugin" in proc.stderr
    assert "upper" in [g["id"] for g in json.loads(proc.stdout)]


def test_outputs_follow_the_umask(studio_home, tmp_path):
    old = os.umask(0o022)
    try:
        proc = studio("generate", "text", "--prompt", "A", "--set", "max_new_tokens=2", "--seed", "1", "--out",
                      str(tmp_path / "a.txt"), home=studio_home)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


EVIL = '''
import os, pickle
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
'''


def test_training_commands_never_unpickle_code(studio_home, tmp_path):
    """--init-from and --resume go through the one safe loader (weights_only=True): a crafted file is refused in
    one line and its code never runs."""
    import pickle
    import types

    marker = tmp_path / "ran"
    mod = types.ModuleType("evil_mod")
    exec(EVIL.format(marker=marker), mod.__dict__)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"unet": mod.Evil()}))
    proc = studio("train", "image", "--out", str(tmp_path / "run"), "--init-from", str(evil), "--steps", "1",
                  home=studio_home)
    assert proc.returncode != 0 and not marker.exists()
    assert "was refused" in proc.stderr and "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    (tmp_path / "a.txt").write_text("to be or not to be " * 50)
    (tmp_path / "b.txt").write_text("that is the question " * 50)
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(evil.read_bytes())
    proc = studio("train", "text", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--work", str(work),
                  "--resume", "--steps", "1", "--holdout", "b.txt", "--vocab-size", "300", home=studio_home)
    assert proc.returncode != 0 and not marker.exists() and "was refused" in proc.stderr


def test_import_copies_no_symbolic_links(studio_home, tmp_path):
    from onnx_fixtures import text_folder

    folder = text_folder(tmp_path / "tiny", "llama")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (folder / "notes.txt").symlink_to(secret)
    proc = studio("models", "import", str(folder), "--name", "tiny", home=studio_home)
    assert proc.returncode == 0 and "Left out notes.txt" in proc.stderr
    assert not (studio_home / "models" / "tiny" / "notes.txt").exists()


def test_a_snapshot_of_links_imports(studio_home, tmp_path):
    """The Hugging Face cache keeps a model's files as links from a snapshot folder to blobs: those import."""
    from onnx_fixtures import text_folder

    blobs = text_folder(tmp_path / "blobs", "llama")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    proc = studio("models", "import", str(snap), "--name", "linked", home=studio_home)
    assert proc.returncode == 0, proc.stderr
    stored = studio_home / "models" / "linked"
    assert (stored / "model.safetensors").is_file() and not (stored / "model.safetensors").is_symlink()


def _sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_concurrent_generations_never_share_a_file(studio_home, tmp_path):
    """Eight processes, same generator, same seed, same second, same folder: eight outputs, each row's hash
    matching its own file."""
    drop(studio_home, "upper", GOOD)
    out = tmp_path / "outs"
    env = dict(os.environ, STUDIO_HOME=str(studio_home), STUDIO_PLUGIN_CHECK="0")
    procs = [subprocess.Popen([sys.executable, "-m", "studio.cli", "generate", "upper", "--prompt", f"p{i}",
                               "--seed", "42", "--out", str(out) + "/", "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    paths = {r["path"] for r in results}
    assert len(paths) == 8
    rows = json.loads(studio("history", "list", "--json", "--limit", "20", home=studio_home).stdout)
    assert len(rows) == 8
    for row in rows:
        for o in row["outputs"]:
            assert _sha(o["path"]) == o["sha256"]
        assert open(row["recipe"]["path"]).read() == row["recipe"]["text"]


def test_named_outputs_keep_their_neighbours(studio_home, tmp_path):
    drop(studio_home, "upper", GOOD)
    (tmp_path / "notes.json").write_text('{"mine": true}')
    proc = studio("generate", "upper", "--prompt", "a", "--out", str(tmp_path / "notes.txt"), home=studio_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": True}
    assert (tmp_path / "notes.txt.json").is_file()
    refused = studio("generate", "upper", "--prompt", "b", "--out", str(tmp_path / "notes.txt"), home=studio_home)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and (tmp_path / "notes.txt").read_text() == "A"
    again = studio("generate", "upper", "--prompt", "b", "--out", str(tmp_path / "notes.txt"), "--overwrite",
                   home=studio_home)
    assert again.returncode == 0 and "replacing" in again.stderr and (tmp_path / "notes.txt").read_text() == "B"
    (tmp_path / "x.txt.json").write_text("not a recipe")
    moved = studio("generate", "upper", "--prompt", "c", "--out", str(tmp_path / "x.txt"), home=studio_home)
    assert moved.returncode == 0 and "x-1.txt instead" in moved.stderr and not (tmp_path / "x.txt").exists()
    assert (tmp_path / "x.txt.json").read_text() == "not a recipe" and (tmp_path / "x-1.txt").read_text() == "C"
    made = studio("generate", "upper", "--prompt", "d", "--out", str(tmp_path / "newdir") + "/", home=studio_home)
    assert made.returncode == 0 and (tmp_path / "newdir").is_dir() and len(list((tmp_path / "newdir").iterdir())) == 2
    (tmp_path / "afile").write_text("x")
    under = studio("generate", "upper", "--prompt", "e", "--out", str(tmp_path / "afile" / "b.txt"), home=studio_home)
    assert under.returncode == 2 and "is a file, so nothing can be saved inside it" in under.stderr


def test_a_locked_history_still_shows_and_keeps_the_output(studio_home, tmp_path):
    import sqlite3

    drop(studio_home, "upper", GOOD)
    studio("history", "list", home=studio_home)  # create the database
    holder = sqlite3.connect(studio_home / "history.sqlite3")
    holder.execute("BEGIN IMMEDIATE")
    try:
        proc = studio("generate", "upper", "--prompt", "kept", "--out", str(tmp_path / "k.txt"), home=studio_home,
                      env={"STUDIO_HISTORY_TIMEOUT": "0.2"})
    finally:
        holder.rollback()
    assert proc.returncode == 1 and "KEPT" in proc.stdout and "busy" in proc.stderr
    assert "not recorded in the history" in proc.stderr and (tmp_path / "k.txt").read_text() == "KEPT"


def test_on_off_variables_read_one_way(monkeypatch, caplog):
    """Every on/off variable takes 1/true/yes/on and 0/false/no/off (STUDIO_CHAT_PREFIX_CACHE=false, say, used to
    leave the cache on: only "0" counted); junk keeps the default with a warning naming the variable; a junk
    history timeout no longer stops every command with a ValueError."""
    from engine import state
    from engine.plugin_check import enabled

    for raw, want in (("false", False), ("OFF", False), ("no", False), ("0", False), ("yes", True), ("", True)):
        monkeypatch.setenv("STUDIO_PLUGIN_CHECK", raw)
        assert enabled() is want
    monkeypatch.setenv("STUDIO_SAFE_MODE", "True")
    assert state.safe_mode()
    monkeypatch.setenv("STUDIO_GUI_WARMUP", "maybe")
    assert state.env_flag("STUDIO_GUI_WARMUP", True) and "STUDIO_GUI_WARMUP='maybe'" in caplog.text
    monkeypatch.setenv("STUDIO_HISTORY_TIMEOUT", "soon")
    assert state.env_number("STUDIO_HISTORY_TIMEOUT", 10.0) == 10.0 and "STUDIO_HISTORY_TIMEOUT" in caplog.text
    monkeypatch.setenv("STUDIO_HISTORY_TIMEOUT", "2.5")
    assert state.env_number("STUDIO_HISTORY_TIMEOUT", 10.0) == 2.5


def test_an_unknown_onnx_variant_is_named_not_silently_ignored(monkeypatch, caplog, tmp_path):
    from engine.backends.runtime import choose_export

    monkeypatch.setenv("STUDIO_ONNX_VARIANT", "int3")
    assert choose_export(tmp_path) is None
    assert "STUDIO_ONNX_VARIANT='int3' is not one of fp32, int8, int4" in caplog.text


def test_files_saved_with_a_byte_order_mark_read_as_their_text(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: it was the first character of the first prompt
    of a prompt file and of a caption or training text, and made a messages file or a job file invalid JSON."""
    from PIL import Image

    from engine.chat import load_messages_file
    from engine.datasets import read_documents, read_pairs
    from engine.errors import UsageError
    from studio.commands import read_prompt_file
    from studio.queue_cli import read_jobfile

    bom = "\ufeff"
    (tmp_path / "prompts.txt").write_text(bom + "ROMEO:\n\n  JULIET:  \n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "prompts.txt") == [(1, "ROMEO:"), (3, "JULIET:")]
    for encoding in ("utf-16", "utf-32"):  # (Notepad's "Unicode": a raw 'utf-8' codec can't decode byte 0xff)
        (tmp_path / "prompts.txt").write_text("ROMEO:\r\n\r\nJULIET:\r\n", encoding=encoding)
        assert read_prompt_file(tmp_path / "prompts.txt") == [(1, "ROMEO:"), (3, "JULIET:")]
    (tmp_path / "prompts.txt").write_bytes("café".encode("cp1252"))
    with pytest.raises(UsageError, match="is not UTF-8 text .* save it as UTF-8"):
        read_prompt_file(tmp_path / "prompts.txt")
    (tmp_path / "chat.json").write_text(bom + '[{"role": "user", "content": "hi"}]', encoding="utf-8")
    assert load_messages_file(tmp_path / "chat.json")[0].content == "hi"
    (tmp_path / "jobs.jsonl").write_text(bom + '{"generator": "text", "prompt": "x"}\n', encoding="utf-8")
    jobs, errors = read_jobfile(tmp_path / "jobs.jsonl")
    assert errors == [] and jobs[0][1].prompt == "x"
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "a.txt").write_text(bom + "a red circle", encoding="utf-8")
    (data / "b.txt").write_text(bom + "To be", encoding="utf-8")
    assert read_pairs(data)[0] == [(data / "a.png", "a red circle")]
    assert read_documents(data)["b.txt"] == "To be"


def test_small_inputs_that_were_ignored_or_misread(tmp_path):
    """A job file with one Latin-1 line was refused as a whole (bad lines are reported and the others run); a
    caption prefix of unknown words was dropped from the caption without a word; `generate text --out t.png`
    wrote text into a .png."""
    from engine.errors import UsageError
    from engine.runner import renderer
    from engine.generators import Result
    from plugins.caption.pipeline import CaptionPipeline
    from studio.queue_cli import read_jobfile

    (tmp_path / "jobs.jsonl").write_bytes(b'{"generator": "text", "prompt": "caf\xe9"}\n'
                                          b'{"generator": "text", "prompt": "x"}\n')
    jobs, errors = read_jobfile(tmp_path / "jobs.jsonl")
    assert [n for n, _ in jobs] == [2] and errors == [f"{tmp_path / 'jobs.jsonl'} line 1: the line is not UTF-8 text."]
    root = Path(__file__).resolve().parent.parent
    captioner = CaptionPipeline.from_folder(root / "resources" / "models" / "shapes-captioner")
    assert len(captioner.prompt("a")) == 2
    with pytest.raises(UsageError, match="does not know the word\\(s\\) 'zzzqqq'"):
        captioner.prompt("zzzqqq a")
    with pytest.raises(UsageError, match="image or audio suffix"):
        renderer(Result(text="hi"), {"generator": "text"})(tmp_path / "t.png")
