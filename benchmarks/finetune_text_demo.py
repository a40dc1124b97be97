"""Issue #18's text demonstration: teach the built-in Shakespeare model the form of a text it has not seen, the
King James Psalms (resources/data/psalms, public domain), with a LoRA, and measure held-out bits per character on
the Psalms and on held-out Shakespeare, before and after.

    .venv/bin/python benchmarks/finetune_text_demo.py [--steps 300] [--rank 8] [--threads 2]

Psalms 1-135 are the training text; Psalms 136-150 are held out (never trained on). Held-out Shakespeare is the
first 20,000 characters of hamlet.txt, which the built-in model never trained on (its --holdout), read from
/work/shared/data/shakespeare or $STUDIO_SHAKESPEARE_DIR. The LoRA is trained by `studio finetune text` itself.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PSALMS = ROOT / "resources" / "data" / "psalms" / "psalms_kjv.txt"
HELD_OUT_FROM = 136


def split_psalms() -> tuple:
    text = PSALMS.read_text(encoding="utf-8")
    cut = re.search(rf"^PSALM {HELD_OUT_FROM}$", text, re.M).start()
    return text[:cut], text[cut:]


def bpc(model, tokenizer, text: str, bos) -> float:
    from plugins.text.train import evaluate_bpc

    ids = ([bos] if isinstance(bos, int) else []) + tokenizer.encode(text).ids
    context = min(256, model.max_positions)
    return evaluate_bpc(model, [ids], len(text), context, context // 2, "cpu")


def scores(adapter=None) -> dict:
    import torch

    from engine.nn.lora import apply_adapters
    from engine.plugins import PluginHost
    from engine.runner import adapter_ref
    from engine.store import ModelStore
    from plugins.text.models import load_model, load_tokenizer, read_config
    from plugins.text.onnx import corpus_dir

    entry = ModelStore(PluginHost().load()).get("shakespeare-llama")
    model = load_model(entry.path, entry.family, "cpu", torch.float32)
    if adapter:
        apply_adapters(model, [adapter_ref(str(adapter))])
    tok, bos = load_tokenizer(entry.path), read_config(entry.path).get("bos_token_id")
    _, held = split_psalms()
    hamlet = (corpus_dir() / "hamlet.txt").read_text(encoding="utf-8")[:20000]
    return {"psalms_136_150": bpc(model, tok, held, bos), "hamlet_first_20k": bpc(model, tok, hamlet, bos)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="ft-demo-home-"))
    work = Path(tempfile.mkdtemp(prefix="ft-demo-"))
    train, held = split_psalms()
    (work / "psalms_1_135.txt").write_text(train, encoding="utf-8")
    before = scores()
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "studio.cli", "finetune", "text", "--model", "shakespeare-llama", "--data",
           str(work / "psalms_1_135.txt"), "--out", str(work / "run"), "--steps", str(a.steps), "--rank",
           str(a.rank), "--threads", str(a.threads), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    result = json.loads(out.stdout.strip().splitlines()[-1])
    after = scores(result["adapter"])
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{a.threads} threads; command: {' '.join(['studio'] + cmd[3:])}")
    print(f"Training text: Psalms 1-{HELD_OUT_FROM - 1} ({len(train):,} characters); held out: Psalms "
          f"{HELD_OUT_FROM}-150 ({len(held):,} characters); LoRA rank {a.rank}, {a.steps} steps in {seconds:.0f} s "
          "(whole command, model load included)\n")
    print("| held-out text | bits/char before | bits/char after | change |\n|---|---|---|---|")
    for name, title in (("psalms_136_150", "Psalms 136-150 (new form)"),
                        ("hamlet_first_20k", "Hamlet, first 20,000 characters (forgetting)")):
        print(f"| {title} | {before[name]:.4f} | {after[name]:.4f} | {after[name] - before[name]:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
