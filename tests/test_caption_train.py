"""The caption training command on a tiny configuration: runs, resumes exactly, exports a loadable folder."""
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import UsageError
from plugins.caption import train

TINY = ["--image-size", "16", "--patch-size", "4", "--enc-hidden", "32", "--enc-layers", "1", "--enc-heads", "4",
        "--dec-embd", "32", "--dec-layers", "1", "--dec-heads", "4", "--batch-size", "4", "--eval-size", "4",
        "--log-every", "1", "--ckpt-every", "2", "--eval-every", "2", "--warmup", "2", "--threads", "1"]


def test_resume_matches_an_uninterrupted_run_and_export_loads(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--out", str(straight), "--steps", "4"] + TINY) == 0
    before = (straight / "checkpoint.safetensors").read_bytes()
    with pytest.raises(UsageError, match="pass --resume to continue it"):  # it started again over the checkpoint
        train.main(["--out", str(straight), "--steps", "4"] + TINY)
    assert (straight / "checkpoint.safetensors").read_bytes() == before
    assert train.main(["--out", str(split), "--steps", "4", "--resume"] + TINY) == 2  # nothing to resume yet
    # stop after 2 of 4 steps: same schedule (--steps 4), then resume
    args = TINY + ["--out", str(split)]
    train_main_stopping_at(args, stop=2)
    assert json.loads((split / "checkpoint.json").read_text())["step"] == 2
    assert train.main(["--steps", "4", "--resume", "--export", str(tmp_path / "model")] + args) == 0
    meta = json.loads((split / "checkpoint.json").read_text())
    assert meta["step"] == 4 and [s["from_step"] for s in meta["segments"]] == [0, 2]
    a, b = load_file(str(straight / "checkpoint.safetensors")), load_file(str(split / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    from plugins.caption.pipeline import CaptionPipeline
    from plugins.caption import check_folder

    folder = tmp_path / "model"
    check_folder(folder)
    studio = json.loads((folder / "studio.json").read_text())
    assert studio["generator"] == "caption" and studio["recipe"]["steps_trained"] == 4
    pipe = CaptionPipeline.from_folder(folder)
    out = pipe(torch.zeros(1, 3, 16, 16).numpy(), max_new_tokens=5)
    assert isinstance(out.text, str) and len(out.token_ids) <= 5


def train_main_stopping_at(args, stop):
    """Run ``--steps 4`` but kill the loop after ``stop`` steps, as a crash would (the checkpoint stays)."""
    real = train.training_batch

    def batch(step, *a):
        if step >= stop:
            raise KeyboardInterrupt
        return real(step, *a)

    train.training_batch = batch
    try:
        train.main(["--steps", "4"] + args)
    except KeyboardInterrupt:
        pass
    finally:
        train.training_batch = real
