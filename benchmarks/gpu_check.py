"""GPU check: on a CUDA machine, compare CUDA fp16 outputs with the CPU fp32 reference and print tokens/s.

    .venv/bin/python benchmarks/gpu_check.py [--tokens 256] [--cpu-dry-run]

Text part: the built-in model (resources/models/shakespeare-llama) and a GPT-2-small-shaped model (124M, random
weights): max |logit difference| CUDA fp16 vs CPU fp32 on a 64-token prompt (relative to the logit range),
agreement of 32 greedy tokens, and decode tokens/s with the KV cache on the GPU. Exits 0 with a message when no
GPU is present. ``--cpu-dry-run`` runs the same code with bfloat16 on the CPU, to test the script itself.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUILTIN = ROOT / "resources" / "models" / "shakespeare-llama"


def greedy(model, prompt, n, device):
    import torch

    past, x, out = None, prompt.to(device), []
    for _ in range(n):
        logits, past = model.step(x, past)
        x = logits.argmax(-1, keepdim=True)
        out.append(int(x))
    return out


def check_text_model(label, model_cpu, make_device_model, device, tokens, sync):
    import torch

    torch.manual_seed(0)
    V = model_cpu.config.vocab_size
    prompt = torch.randint(1, V, (1, 64))
    with torch.inference_mode():
        ref, _ = model_cpu(prompt, use_cache=False)
        model_dev = make_device_model()
        got, _ = model_dev(prompt.to(device), use_cache=False)
        diff = (got.float().cpu() - ref).abs().max().item()
        scale = (ref.max() - ref.min()).item()
        g_cpu = greedy(model_cpu, prompt[:, :16], 32, "cpu")
        g_dev = greedy(model_dev, prompt[:, :16], 32, device)
        agree = next((i for i, (a, b) in enumerate(zip(g_cpu, g_dev)) if a != b), 32)
        greedy(model_dev, prompt[:, :16], 8, device)  # warm-up
        sync()
        t = time.perf_counter()
        greedy(model_dev, prompt[:, :16], tokens, device)
        sync()
        tps = tokens / (time.perf_counter() - t)
    return (f"| {label} | {diff:.3g} | {diff / scale:.2e} | {agree}/32 | {tps:.0f} |")


def text_part(args) -> list:
    import torch
    import transformers

    from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel, load_hf_state_dict
    from plugins.text.models import load_model

    device = "cpu" if args.cpu_dry_run else "cuda"
    dtype = torch.bfloat16 if args.cpu_dry_run else torch.float16
    sync = (lambda: None) if args.cpu_dry_run else torch.cuda.synchronize
    rows = ["| model | max abs logit diff vs CPU fp32 | relative to logit range | greedy tokens equal (prefix) | "
            f"tok/s ({device} {str(dtype).split('.')[-1]}, KV cache, {args.tokens} tokens) |", "|---|---|---|---|---|"]
    if BUILTIN.is_dir():
        cpu = load_model(BUILTIN, "llama", "cpu")
        rows.append(check_text_model("shakespeare-llama", cpu, lambda: load_model(BUILTIN, "llama", device, dtype),
                                     device, args.tokens, sync))
    if args.skip_gpt2:
        return rows
    cfg = transformers.GPT2Config()
    torch.manual_seed(0)
    cpu = GPT2LMHeadModel(GPT2Config.from_dict(cfg.to_dict())).eval()
    state = cpu.state_dict()

    def make():
        m = GPT2LMHeadModel(GPT2Config.from_dict(cfg.to_dict()))
        load_hf_state_dict(m, state)
        return m.to(device=device, dtype=dtype).eval()

    rows.append(check_text_model("GPT-2 small shape (random)", cpu, make, device, args.tokens, sync))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--cpu-dry-run", action="store_true", help="run the checks with bfloat16 on the CPU")
    p.add_argument("--skip-gpt2", action="store_true", help="only the built-in model")
    args = p.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("No CUDA GPU found: skipping the GPU check (nothing to compare).")
        return 0
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("\n".join(text_part(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
