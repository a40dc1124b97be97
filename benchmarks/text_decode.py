"""Benchmark: text decoding speed on the CPU, batch 1, in one run.

    .venv/bin/python benchmarks/text_decode.py [--tokens 256] [--prompt-tokens 16] [--threads N] [--write FILE]

For the built-in model (resources/models/shakespeare-llama) and a GPT-2-small-shaped model (124M parameters,
random weights), greedy decoding of ``--tokens`` new tokens after a ``--prompt-tokens`` prompt:
- studio pipeline with the KV cache, and without it (whole sequence recomputed each token);
- transformers' ``generate`` (KV cache, greedy) on the same weights, and our speed as a ratio of it;
- the read-bandwidth ceiling: measured read bandwidth (all threads) / bytes of weights read per token, and the
  fraction of it reached (a model that fits in the CPU caches can exceed it; the ceiling then says little).
Timings are the best of ``--repeats`` runs, ours and transformers alternating. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUILTIN = ROOT / "resources" / "models" / "shakespeare-llama"


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """GB/s reading a large float32 tensor with ``torch.sum`` on all torch threads (best of ``repeats``)."""
    import torch

    buf = torch.ones(mib * (1 << 20) // 4)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(model) -> int:
    """Bytes of parameters read for one decode step: every matrix once; of the embedding only the head's read
    (a tied embedding counts once, an untied input embedding only one row)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith(("embed_tokens.weight", "wte.weight")) and not _tied(model):
            total += p.shape[1] * p.element_size()
        elif name.endswith("wpe.weight"):
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_model(label, ours, ref, tokenizer, bos, args, bandwidth):
    import numpy as np
    import torch

    from plugins.text.pipeline import NoCacheDecoder, TextPipeline, TextRequest, TorchDecoder
    from plugins.text.sampling import SamplingOptions

    V = ours.config.vocab_size
    rng = np.random.default_rng(0)
    prompt_ids = [int(i) for i in rng.integers(1, V, size=args.prompt_tokens)]
    n = min(args.tokens, ours.max_positions - args.prompt_tokens)  # stay inside the context (no window sliding)
    req = TextRequest(max_new_tokens=n, sampling=SamplingOptions(temperature=0))

    def run_pipe(decoder):
        pipe = TextPipeline(decoder, tokenizer, bos_token_id=None, eos_token_ids=[])
        pipe.encode_prompt = lambda prompt: list(prompt_ids)  # fixed token prompt, same for every variant
        return list(pipe.run("", req))[-1].token_ids

    rows = {}
    x = torch.tensor([prompt_ids])

    def run_ref():
        with torch.inference_mode():
            out = ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    # ours and transformers alternate, so that a change in machine load hits both alike; best of each
    t_cache = t_ref = float("inf")
    for _ in range(args.repeats):
        t, ids_cache = timed(lambda: run_pipe(TorchDecoder(ours)), 1)
        t_cache = min(t, t_cache)
        t, ids_ref = timed(run_ref, 1)
        t_ref = min(t, t_ref)
    t_nocache, ids_nocache = timed(lambda: run_pipe(NoCacheDecoder(TorchDecoder(ours))), 1)
    bpt = weight_bytes_per_token(ours)
    ceiling = bandwidth * 1e9 / bpt
    rows = {
        "model": label, "new": n, "params": sum(p.numel() for p in ours.parameters()),
        "cache": n / t_cache, "nocache": n / t_nocache, "hf": n / t_ref,
        "same_tokens": ids_cache == ids_ref == ids_nocache, "bytes": bpt, "ceiling": ceiling,
    }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--model", default=str(BUILTIN), help="Llama model folder (default: the built-in model)")
    p.add_argument("--write", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)

    import torch
    import transformers

    from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel, load_hf_state_dict
    from plugins.text.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = read_bandwidth_gbs()
    results = []

    folder = Path(args.model)
    ours = load_model(folder, "llama")
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = load_tokenizer(folder)
    label = f"{folder.name} (built-in)" if folder.resolve() == BUILTIN.resolve() else folder.name
    results.append(bench_model(label, ours, ref, tok, 0, args, bandwidth))

    if not args.skip_gpt2:
        cfg = transformers.GPT2Config()  # 124M: 12 layers, 768 wide, 50257 tokens, 1024 positions
        ref = transformers.GPT2LMHeadModel(cfg).eval()
        ours = GPT2LMHeadModel(GPT2Config.from_dict(cfg.to_dict())).eval()
        load_hf_state_dict(ours, ref.state_dict())
        results.append(bench_model("GPT-2 small shape (random)", ours, ref, tok, None, args, bandwidth))

    lines = [
        f"Text decoding, CPU, batch 1, greedy, {args.prompt_tokens}-token prompt + {args.tokens} new tokens, "
        f"fp32, {args.threads} threads; read bandwidth {bandwidth:.1f} GB/s (torch.sum over 1 GiB, all threads).",
        "",
        "| model | params | new tokens | studio tok/s (KV cache) | studio tok/s (no cache) | cache / no cache | transformers "
        "generate tok/s | studio / transformers | weight MB read per token | bandwidth ceiling tok/s | fraction of "
        "ceiling | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['new']} | {r['cache']:.1f} | {r['nocache']:.1f} | "
                     f"{r['cache'] / r['nocache']:.2f}x | {r['hf']:.1f} | {r['cache'] / r['hf']:.2f} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['ceiling']:.0f} | {r['cache'] / r['ceiling']:.2f} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    try:
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        load = "?"
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
                  f"{torch.__version__}, transformers {transformers.__version__}; load at the end: {load}"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
