"""`studio caption-folder`: a caption file beside every image, batched, resumable, atomic, recorded in history."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import caption_refs as R
from studio.cli import main


@pytest.fixture
def blip_model(tmp_path):
    R.save_blip(tmp_path / "tiny-blip")
    assert main(["models", "import", str(tmp_path / "tiny-blip"), "--name", "tiny-blip"]) == 0
    return "tiny-blip"


def _folder(path, n=5):
    path.mkdir()
    for i, im in enumerate(R.random_images(n, seed=4)):
        im.save(path / f"img{i}.png")
    return path


def test_folder_captions_match_single_images_and_resume(tmp_path, blip_model, capsys):
    d = _folder(tmp_path / "set")
    (d / "img1.txt").write_text("hand written\n")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    assert main(["caption-folder", str(d), "--model", blip_model, "--prefix", "a picture of",
                 "--batch-size", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 4 and (d / "img1.txt").read_text() == "hand written\n"
    assert "broken.png" in err and "anim.gif" in err and "animated" in err
    assert not (d / "broken.txt").exists() and not (d / "anim.txt").exists()
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]
    for row in rows:  # the same caption as one image at a time, recorded in history
        assert main(["generate", "caption", "--image", row["image"], "--model", blip_model,
                     "--set", "prefix=a picture of", "--json"]) == 0
        single = json.loads(capsys.readouterr().out)
        assert single["text"] == row["caption"] == open(row["path"]).read().strip()
        assert row["caption"].startswith("a picture of")
        assert main(["history", "show", str(row["history_id"]), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["recipe"]["image"]["path"] == row["image"]
    # a second run keeps everything (resume); --overwrite replaces the hand-written caption
    (d / "img3.txt").unlink()
    assert main(["caption-folder", str(d), "--model", blip_model, "--json"]) == 0
    out, _ = capsys.readouterr()
    assert [json.loads(line)["image"].endswith("img3.png") for line in out.splitlines()] == [True]
    assert main(["caption-folder", str(d), "--model", blip_model, "--overwrite", "--ext", "caption"]) == 0
    assert (d / "img1.caption").exists() and (d / "img1.txt").read_text() == "hand written\n"


def test_folder_bad_input(tmp_path, blip_model, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["caption-folder", str(empty), "--model", blip_model]) == 2
    assert "has no images" in capsys.readouterr().err
    assert main(["caption-folder", str(tmp_path / "nope"), "--model", blip_model]) == 2
    d = _folder(tmp_path / "ro", 1)
    assert main(["caption-folder", str(d), "--model", blip_model, "--ext", ".png"]) == 2
    import engine.caption_folder as cf

    monkeypatch.setattr(cf.os, "access", lambda path, mode: False)  # a read-only folder (root can write anywhere)
    assert main(["caption-folder", str(d), "--model", blip_model]) == 2
    assert "read-only" in capsys.readouterr().err
    assert not (d / "img0.txt").exists()


def test_prompt_from_caption(tmp_path, capsys):
    """Image -> caption (the built-in shapes captioner) -> the image generator's prompt, recorded as such."""
    from engine.shapes import render, sample_scene

    scene = tmp_path / "scene.png"
    Image.fromarray(render(sample_scene(np.random.default_rng(5)), 32)).save(scene)
    assert main(["generate", "caption", "--image", str(scene), "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)["text"]
    assert caption
    assert main(["generate", "image", "--prompt-from-caption", str(scene), "--set", "steps=2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["prompt"] == caption and f"prompt from caption: {caption}" in err
    assert main(["generate", "image", "--prompt", "x", "--prompt-from-caption", str(scene)]) == 2


def test_blip_onnx_export_optimum_layout_and_folder(tmp_path, blip_model, capsys):
    """BLIP through the parity gate; the export holds Optimum's three graphs with their names; captions on
    onnxruntime (folder, prefix, beam search) equal torch's."""
    import onnx

    assert main(["export-onnx", blip_model, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["parity_passed"] and manifest["parity"]["optimum_greedy_captions"]["identical"] == "8/8"
    folder = manifest["folder"]
    names = {f: onnx.load(os.path.join(folder, f), load_external_data=False).graph
             for f in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")}
    assert [o.name for o in names["encoder_model.onnx"].output] == ["last_hidden_state"]
    assert [i.name for i in names["decoder_model.onnx"].input] == ["input_ids", "encoder_hidden_states"]
    assert "past_key_values.0.encoder.key" in [i.name for i in names["decoder_with_past_model.onnx"].input]
    for side in ("config.json", "preprocessor_config.json", "tokenizer.json", "onnx.json"):
        assert os.path.isfile(os.path.join(folder, side))
    d = _folder(tmp_path / "set", 4)
    texts = {}
    for backend in ("torch", "onnx"):
        assert main(["caption-folder", str(d), "--model", blip_model, "--backend", backend, "--overwrite",
                     "--prefix", "a picture of", "--set", "num_beams=3", "--json"]) == 0
        texts[backend] = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert texts["torch"] == texts["onnx"] and len(texts["onnx"]) == 4


def test_plan_refuses_shared_caption_files_folders_and_binary_targets(tmp_path):
    """a.png and a.jpg both wrote a.txt (one caption lost, 'wrote 2'); a folder named like a caption counted as a
    kept caption; --ext .tif --overwrite replaced a TIFF image with text."""
    from PIL import Image

    from engine.caption_folder import plan_folder
    from engine.errors import UsageError

    d = tmp_path / "pics"
    d.mkdir()
    for name in ("a.png", "a.jpg", "b.png"):
        Image.new("RGB", (8, 8), "red").save(d / name)
    with pytest.raises(UsageError, match="a.jpg and a.png would share the caption file a.txt; rename one"):
        plan_folder(d)
    (d / "a.jpg").unlink()
    (d / "b.txt").mkdir()
    with pytest.raises(UsageError, match="b.txt is not a caption file \\(a folder\\)"):
        plan_folder(d)
    (d / "b.txt").rmdir()
    Image.new("RGB", (8, 8), "blue").save(d / "b.tif")  # an image the studio does not caption, named like a caption
    with pytest.raises(UsageError, match="b.tif is not a caption file \\(not text\\)"):
        plan_folder(d, ext=".tif", overwrite=True)
    (d / "a.caption").write_text("a hand-written caption")
    plan = plan_folder(d, ext=".caption", overwrite=True)
    assert [p.name for p in plan.todo] == ["a.png", "b.png"]


def test_utf16_and_bom_captions_are_text_and_binary_files_are_not(tmp_path):
    """A UTF-16 caption file (as Windows Notepad saves one) counted as "not text", so --overwrite refused it."""
    from PIL import Image

    from engine.caption_folder import plan_folder
    from engine.errors import UsageError

    d = tmp_path / "pics"
    d.mkdir()
    captions = {"bom16": ("utf-16", "a red circle"), "le16": ("utf-16-le", "a blue square, ünïcode"),
                "be16": ("utf-16-be", "a green triangle"), "bom8": ("utf-8-sig", "a caption"),
                "long": ("utf-16", "é" * 2047 + "😀" + "x" * 100),  # the emoji's surrogate pair is cut at 4 kB
                "cp1252": ("cp1252", "café naïve, “quoted”"), "bom32": ("utf-32", "a caption")}  # (these two
    # stopped the whole run as "not text")
    for name, (encoding, text) in captions.items():
        Image.new("RGB", (8, 8), "red").save(d / f"{name}.png")
        (d / f"{name}.txt").write_bytes(text.encode(encoding))
    plan = plan_folder(d, overwrite=True)
    assert sorted(p.stem for p in plan.todo) == sorted(captions) and not plan.kept
    assert sorted(p.stem for p in plan_folder(d).kept) == sorted(captions)  # kept without --overwrite
    Image.new("RGB", (8, 8), "red").save(d / "z.png")
    for binary in (bytes(range(256)) * 16, b"\xff\xfe\0\0" + bytes(100), (d / "z.png").read_bytes()):
        (d / "z.txt").write_bytes(binary)
        with pytest.raises(UsageError, match="z.txt is not a caption file \\(not text\\)"):
            plan_folder(d, overwrite=True)
