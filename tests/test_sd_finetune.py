"""`studio finetune sd` (issue #18 for the imported Stable Diffusion family): a LoRA trained on a tiny pipeline saved
by diffusers, written in kohya's format, that diffusers' load_lora_weights reads to the studio's picture; a resumed
run reaches the uninterrupted run's loss; bad datasets are one sentence."""
import json

import numpy as np
import pytest
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from engine.diffusion import SampleSettings  # noqa: E402
from sd_fixtures import save_pipeline  # noqa: E402
from test_sd_pipeline import ours, reference  # noqa: E402


def dataset(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.zeros((48, 40, 3), np.uint8)  # not square: the finetuner crops the centre
        a[:, :] = rng.integers(0, 255, 3)
        a[10:30, 8:28] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text("a red cat on the sofa" if i % 2 else "a blue dog")
    return folder


@pytest.fixture()
def tiny(tmp_path, studio_home):
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    pipe = save_pipeline(tmp_path / "tiny-sd", "sd1")
    entry = ModelStore(PluginHost().load()).import_(tmp_path / "tiny-sd")
    return pipe, entry


def args(entry, data, out, *extra, steps=8):
    return ["--model", entry.name, "--data", str(data), "--out", str(out), "--resolution", "32", "--steps", str(steps),
            "--lr", "5e-3", "--batch", "2", "--eval-every", "4", "--checkpoint-every", "4", "--threads", "1",
            *extra]


def test_finetune_writes_a_kohya_lora_that_diffusers_reads(tiny, tmp_path):
    from safetensors import safe_open

    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from plugins.stable_diffusion.finetune import main
    from plugins.stable_diffusion.model import load

    pipe, entry = tiny
    data = dataset(tmp_path / "data")
    assert main(args(entry, data, tmp_path / "run", "--text-encoder")) == 0
    adapter = tmp_path / "run" / "adapter" / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 8 and all(np.isfinite(e["loss"]) for e in log)
    assert '"resolution": 32' in (tmp_path / "run" / "finetune.json").read_text()
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "tiny-sd", safety_checker=None)
    ref.saved_scheduler = json.loads((tmp_path / "tiny-sd" / "scheduler" / "scheduler_config.json").read_text())
    ref.load_lora_weights(str(adapter))
    want = reference(diffusers.StableDiffusionPipeline, ref, "ddim")
    sd = load(entry.path)
    apply_adapters({"unet": sd.unet, "text_encoder": sd.text_encoder}, [AdapterRef("a", adapter, "", 1.0)])
    got = ours(sd, SampleSettings(4, 7.5, "ddim"))
    base = ours(load(entry.path), SampleSettings(4, 7.5, "ddim"))
    assert np.abs(got - want).max() < 1e-3 and np.abs(got - base).max() > 1e-4


def test_a_killed_run_resumes_to_the_same_loss(tiny, tmp_path):
    import signal
    import subprocess
    import sys

    _, entry = tiny
    data = dataset(tmp_path / "data")

    def cmd(out, *extra):
        return [sys.executable, "-m", "studio.cli", "finetune", "sd", *args(entry, data, out, "--json", *extra)]

    def losses(stdout):
        return [json.loads(line)["loss"] for line in stdout.splitlines() if line.startswith('{"step"')]

    straight = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith('{"step": 6'):
            proc.send_signal(signal.SIGKILL)  # after the checkpoint of step 4
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert abs(losses(resumed.stdout)[-1] - losses(straight.stdout)[-1]) < 1e-4


def test_bad_datasets_are_one_sentence(tiny, tmp_path):
    from engine.errors import UsageError
    from plugins.stable_diffusion.finetune import main

    _, entry = tiny
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        main(args(entry, tmp_path / "empty", tmp_path / "r1"))
    data = dataset(tmp_path / "data")
    (data / "im0.txt").unlink()
    with pytest.raises(UsageError, match="1 image\\(s\\) .* have no same-named .txt caption"):
        main(args(entry, data, tmp_path / "r2"))
    with pytest.raises(UsageError, match="multiple of 8"):
        main(args(entry, dataset(tmp_path / "d2"), tmp_path / "r3") + ["--resolution", "30"])
    with pytest.raises(UsageError, match="shakespeare-llama is a"):
        main(["--model", "shakespeare-llama", "--data", str(data), "--out", str(tmp_path / "r4")])
