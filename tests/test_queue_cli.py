"""The queue from the command line: `studio queue add/list/run` (grids, caption folders, controls) and
`studio batch` (job files, Ray, output paths)."""
import json
from pathlib import Path

import pytest

from engine.history import History
from engine.jobqueue import JobQueue
from tests.plugin_samples import GOOD, PIXELS, drop

def test_cli_batch_names_bad_lines_and_runs_the_others(studio_home, tmp_path, capsys):
    from studio.cli import main

    drop(studio_home, "good", GOOD)
    jobfile = tmp_path / "jobs.jsonl"
    jobfile.write_text('{"generator": "upper", "prompt": "one"}\n'
                       '{not json\n'
                       '\n'
                       '{"generator": "upper", "prompt": "two", "options": {"repeat": 99}}\n'
                       '{"generator": "upper", "prompt": "three", "colour": "red"}\n'
                       '{"generator": "upper", "prompt": "four", "options": {"repeat": 2}}\n')
    assert main(["batch", str(jobfile), "--json"]) == 1
    out, err = capsys.readouterr()
    assert len([line for line in err.splitlines() if " line " in line]) == 3  # one line per bad line
    assert "line 2:" in err and "line 4:" in err and "repeat" in err and "line 5:" in err and "colour" in err
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert texts == ["ONE", "FOUR FOUR"]
    assert sorted(e.prompt for e in History().list()) == ["four", "one"]


@pytest.mark.parametrize("grid, words", [
    (["steps=1,2", "steps=3"], "names steps twice"),  # the second used to replace the first, silently
    (["=1,2"], "--grid expects OPTION=V1,V2"),
    (["steps="], "has no values"),
])
def test_cli_queue_grid_mistakes_are_refused(studio_home, capsys, grid, words):
    from studio.cli import main

    args = ["queue", "add", "image", "--prompt", "a red circle"]
    for spec in grid:
        args += ["--grid", spec]
    assert main(args) == 2
    assert words in capsys.readouterr().err
    assert JobQueue().list() == []


def test_cli_queue_caption_folder_and_controls(studio_home, tmp_path, capsys):
    from PIL import Image

    from studio.cli import main

    folder = tmp_path / "pics"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert main(["queue", "add", "caption", "--folder", str(folder), "--set", "max_new_tokens=6"]) == 0
    assert "queued job(s) 1, 2, 3" in capsys.readouterr().out
    assert main(["queue", "pause"]) == 0 and main(["queue", "cancel", "2"]) == 0
    assert main(["queue", "run", "--until-empty"]) == 0
    assert JobQueue().get(1).state == "queued"  # paused: nothing ran
    assert main(["queue", "resume"]) == 0 and main(["queue", "run", "--until-empty"]) == 0
    assert [JobQueue().get(i).state for i in (1, 2, 3)] == ["done", "cancelled", "done"]
    assert main(["queue", "cancel", "1"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["queue", "add", "caption", "--folder", str(tmp_path / "nope")]) == 2
    # inputs given relative to where `queue add` ran are kept absolute: the queue is worked from other folders,
    # where the same relative path named another image, silently
    import os

    here = os.getcwd()
    try:
        os.chdir(folder)
        assert main(["queue", "add", "caption", "--image", "0.png", "--json"]) == 0
        from engine.runner import Job
        from studio.queue_cli import absolute_inputs

        other = absolute_inputs(Job("text", loras=["style:0.5", "a:b.safetensors"], model="./m", mask="m.png"))
    finally:
        os.chdir(here)
    assert JobQueue().get(json.loads(capsys.readouterr().out)["ids"][0]).job["image"] == str(folder / "0.png")
    assert other.loras == [f"{folder / 'style'}:0.5", str(folder / "a:b.safetensors")]
    assert (other.model, other.mask) == (str(folder / "m"), str(folder / "m.png"))


def test_cli_batch_on_ray_needs_a_worker(studio_home, tmp_path, capsys):
    """--workers 0 ran with one worker, silently; refused before Ray is touched."""
    from studio.cli import main

    jobfile = tmp_path / "jobs.jsonl"
    jobfile.write_text('{"generator": "text", "prompt": "x"}\n')
    assert main(["batch", str(jobfile), "--ray", "auto", "--workers", "0"]) == 2
    assert "--workers must be 1 or more" in capsys.readouterr().err and JobQueue().list() == []


def test_cli_batch_keeps_input_paths_absolute(studio_home, tmp_path, monkeypatch):
    """`studio batch --folder imgs` queued imgs/b1.png as written: a worker started in another folder (a server,
    another terminal) captioned that folder's imgs/b1.png, silently."""
    from PIL import Image

    from studio.cli import main

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "imgs" / "b1.png")
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "--folder", "imgs", "--generator", "caption", "--set", "max_new_tokens=4"]) == 0
    (job,) = JobQueue().list()
    assert job.job["image"] == str(tmp_path / "imgs" / "b1.png") and job.state == "done"


def test_cli_queue_list_tells_a_grids_jobs_apart_and_run_names_its_sheet(studio_home, capsys):
    """The rows of a grid looked identical (same generator and prompt), and `queue run` never said where the
    contact sheet went."""
    from studio.cli import main

    drop(studio_home, "pixels", PIXELS)
    assert main(["queue", "add", "pixels", "--prompt", "p", "--seeds", "1,2", "--grid", "size=4,8"]) == 0
    assert main(["queue", "add", "pixels", "--prompt", "q", "--seed", "7"]) == 0
    capsys.readouterr()
    assert main(["queue", "list"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.split()[-3:] == ["SEED", "GRID", "NOTE"]
    assert [r.split()[-3:] for r in rows] == [["1", "#1", "size=4"], ["1", "#1", "size=8"], ["2", "#1", "size=4"],
                                              ["2", "#1", "size=8"], ["q", "7", "-"]]
    assert main(["queue", "run", "--until-empty"]) == 0
    out = capsys.readouterr().out.splitlines()
    sheet = JobQueue().grid(1)["sheet"]
    assert out[4] == f"grid 1: contact sheet {sheet}" and Path(sheet).is_file()
    assert out[5].startswith("job 5: done") and len(out) == 6


def test_cli_batch_prints_each_output_path(studio_home, tmp_path, capsys):
    """Without --json, `studio batch` printed nothing on stdout: where did the outputs go?"""
    from studio.cli import main

    drop(studio_home, "good", GOOD)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    assert main(["batch", "--prompt-file", str(prompts), "--generator", "upper"]) == 0
    paths = capsys.readouterr().out.splitlines()
    assert [Path(p).read_text() for p in paths] == ["ONE", "TWO"]
    assert sorted(paths) == sorted(e.outputs[0]["path"] for e in History().list())
