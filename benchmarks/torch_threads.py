"""Torch CPU threads for a small model: decode speed with 1 and 2 threads, on an idle machine and with one core busy.

    .venv/bin/python benchmarks/torch_threads.py [--model resources/models/shakespeare-llama] [--tokens 128]

The busy core is a separate Python process spinning in a loop, like any other program (or the GUI thread) that
keeps a core occupied. Prints tokens/s (best of 3 passes of greedy decoding with the KV cache, batch 1).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "resources" / "models" / "shakespeare-llama"))
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args(argv)
    import torch

    from plugins.text.models import load_model, read_config

    model = load_model(args.model, read_config(args.model).get("model_type", "llama"), "cpu")
    prompt = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def rate() -> float:
        past, x = None, prompt
        t = time.perf_counter()
        for _ in range(args.tokens):
            logits, past = model.step(x, past)
            x = logits.argmax(-1, keepdim=True)
        return args.tokens / (time.perf_counter() - t)

    print("| machine | torch threads | tokens/s |\n|---|---|---|")
    for label in ("idle", "one core busy"):
        spinner = None
        if label != "idle":
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                rate()  # warm-up
                print(f"| {label} | {threads} | {max(rate() for _ in range(3)):.0f} |", flush=True)
        finally:
            if spinner is not None:
                spinner.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
