"""LoRA against full fine-tuning: seconds per training step and peak resident memory, on the CPU (issue #18).

    .venv/bin/python benchmarks/finetune_cost.py [--threads 2] [--steps 6]

Each mode runs in its own process (peak RSS is per process): a Llama-shaped model of about 110M parameters with
random weights (the studio's own decoder, plugins/text/llama.py), batch 4 x 128 tokens, AdamW, fp32. "LoRA" adapts
q/k/v/o at rank 8 (engine.nn.lora.wrap, the base frozen), as `studio finetune text` does by default; "full" trains
every weight. The first step (allocation) is not timed; the rest take turns with nothing else in the process.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=True)


def child(mode: str, steps: int, threads: int) -> dict:
    import torch

    from engine.nn.lora import LoraSpec, trainable, wrap
    from plugins.text.llama import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(CONFIG)).train()
    n_all = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        wrap(model, LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
        params = [p for _, p in trainable(model)]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 129))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        logits, _ = model(ids[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"mode": mode, "parameters": n_all, "trainable": sum(p.numel() for p in params),
            "median_step_s": times[len(times) // 2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", choices=("lora", "full"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.threads)))
        return 0
    rows = {}
    for mode in ("lora", "full", "lora", "full"):  # taking turns; the better of two runs each
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(a.threads), "--steps",
                              str(a.steps)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        best = rows.get(mode)
        rows[mode] = r if best is None or r["median_step_s"] < best["median_step_s"] else best
    lora, full = rows["lora"], rows["full"]
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.threads} threads, "
          f"{lora['parameters'] / 1e6:.0f}M-parameter Llama shape, batch 4 x 128 tokens, AdamW, fp32\n")
    print("| mode | trainable parameters | s per step (median) | peak resident memory |\n|---|---|---|---|")
    for r in (lora, full):
        print(f"| {r['mode']} | {r['trainable']:,} ({100 * r['trainable'] / r['parameters']:.2f} %) | "
              f"{r['median_step_s']:.2f} | {r['peak_rss_mb']:.0f} MB |")
    print(f"\nLoRA: {full['median_step_s'] / lora['median_step_s']:.2f}x the steps per second of full fine-tuning, "
          f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x its peak memory.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
