import json
import os
import sqlite3

import pytest
from PIL import Image

from engine import outputs
from engine.errors import StateError, UsageError
from engine.history import History


def test_history_add_list_get_delete(studio_home):
    h = History()
    a = h.add({"generator": "text", "prompt": "ROMEO: hi", "seed": 1, "created": 1.0}, [{"path": "a", "sha256": "x"}])
    b = h.add({"generator": "image", "prompt": "a red 50%_circle", "seed": 2, "created": 2.0}, [])
    assert [e.id for e in h.list()] == [b, a]
    assert [e.id for e in h.list(search="romeo")] == [a]
    assert [e.id for e in h.list(search="50%_")] == [b]
    assert h.get(a).recipe["seed"] == 1
    h.delete(a)
    with pytest.raises(UsageError):
        h.get(a)
    assert History().list()[0].id == b  # survives a new connection


def test_history_write_is_a_transaction(studio_home):
    h = History()
    with pytest.raises(TypeError):
        h.add({"generator": "text", "prompt": "p", "seed": 1, "bad": object()}, [])
    assert h.list() == []
    with pytest.raises(KeyError):
        h.add({"prompt": "no generator"}, [])
    assert h.list() == []


def test_corrupt_history_database_gives_a_clear_error(studio_home):
    (studio_home / "history.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="is damaged.*rename it"):
        History().list()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    tmp_path = tmp_path / "outs"
    tmp_path.mkdir()
    target = tmp_path / "out.txt"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StateError, match="No space left"):
        outputs.atomic_write_bytes(target, b"new content")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(StateError, match="Cannot write"):
            outputs.atomic_write_bytes(ro / "x.txt", b"x")
    finally:
        ro.chmod(0o700)


def test_png_metadata_round_trip(tmp_path):
    recipe = {"generator": "image", "prompt": "a small red circle", "seed": 7,
              "options": {"steps": 20, "guidance": 3.5, "sampler": "dpmpp_2m", "negative_prompt": "blue"},
              "model": {"name": "shapes", "hash": "abcdef0123456789"}, "width": 4, "height": 4}
    path = tmp_path / "x.png"
    outputs.write_png(path, Image.new("RGB", (4, 4), "red"), recipe)
    assert outputs.read_png_recipe(path) == recipe
    with Image.open(path) as im:
        a1111 = outputs.parse_a1111_parameters(im.text["parameters"])
    assert a1111["prompt"] == "a small red circle"
    assert a1111["seed"] == 7
    assert a1111["options"] == {"steps": 20, "guidance": 3.5, "sampler": "dpmpp_2m", "negative_prompt": "blue"}
    assert "Sampler: DPM++ 2M," in im.text["parameters"]  # A1111's own name, as civitai and A1111 read it
    for name, ours in (("DPM++ 2M Karras", "dpmpp_2m_karras"), ("Euler a", "euler_a"), ("DDIM", "ddim")):
        text = f"a cat\nSteps: 20, Sampler: {name}, CFG scale: 7, Seed: 1, Size: 512x512"
        assert outputs.parse_a1111_parameters(text)["options"]["sampler"] == ours


def test_a1111_only_png_is_read(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: dog\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512")
    path = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(path, pnginfo=info)
    found = outputs.read_png_recipe(path)
    assert found["prompt"] == "a cat" and found["seed"] == 42 and found["source"] == "a1111"
    assert found["options"]["steps"] == 30 and found["options"]["negative_prompt"] == "dog"


def test_read_png_recipe_rejects_non_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(UsageError, match="Cannot read"):
        outputs.read_png_recipe(bad)


def test_text_and_audio_writers(tmp_path):
    import numpy as np
    import soundfile as sf

    files = outputs.write_text(tmp_path / "t.txt", "héllo", {"seed": 1})
    assert files[0].read_text() == "héllo" and json.loads(files[1].read_text()) == {"seed": 1}
    wav = outputs.write_audio(tmp_path / "a.wav", np.zeros(100, dtype="float32"), 8000, {"seed": 2})
    data, rate = sf.read(wav[0])
    assert rate == 8000 and len(data) == 100
    flac = outputs.write_audio(tmp_path / "a.flac", np.zeros(100, dtype="float32"), 8000, {})
    assert sf.info(str(flac[0])).format == "FLAC"
    with pytest.raises(UsageError):
        outputs.write_audio(tmp_path / "a.mp3", np.zeros(10), 8000, {})


def test_outputs_never_replace_a_device_or_a_pipe_and_say_which_name_was_taken(studio_home, tmp_path):
    """`--out /dev/null --overwrite` (as root) put a regular file where the device was; a FIFO likewise. When only
    the recipe beside a text output existed, the note said the text file existed."""
    from engine import commit

    def render(path):
        return outputs.text_files(path, "hello", {"generator": "text"})

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(UsageError, match="is not a regular file"):
            commit.save(render, target, {"generator": "text"}, None, overwrite=True)
    assert fifo.exists() and not fifo.is_file()
    names = [p for p, _ in render(tmp_path / "a.txt")]
    sidecar = next(p for p in names if p != tmp_path / "a.txt")
    sidecar.write_text("precious")
    saved = commit.save(render, tmp_path / "a.txt", {"generator": "text"}, None)
    assert saved.notes == [f"{sidecar} exists; saved as a-1.txt instead"] and sidecar.read_text() == "precious"


def test_out_never_names_the_studios_own_files(studio_home, capsys):
    """`--out $STUDIO_HOME/history.sqlite3 --overwrite` replaced the history database: every row was lost."""
    from studio.cli import main

    main(["history", "list"])  # the database exists
    before = (studio_home / "history.sqlite3").read_bytes()
    capsys.readouterr()
    for name in ("history.sqlite3", "settings.json", "queue.sqlite3"):
        assert main(["generate", "text", "--prompt", "x", "--out", str(studio_home / name), "--overwrite"]) == 2
        assert "one of the studio's own files" in capsys.readouterr().err
    assert (studio_home / "history.sqlite3").read_bytes() == before
