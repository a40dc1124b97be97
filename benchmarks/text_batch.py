"""Benchmark: batched text generation (`studio generate text --prompt-file FILE --batch-size N`) on the CPU.

    .venv/bin/python benchmarks/text_batch.py [--prompts 8] [--tokens 64] [--sizes 1,2,4,8] [--rounds 3]

The built-in model (resources/models/shakespeare-llama) on torch and on its ONNX export (fp32, made in a
temporary folder), greedy, ``--prompts`` prompts of different lengths through the studio's generation loop
(``TextPipeline.run_batch``): all prompts' new tokens per second of wall time at each batch size, its speedup over
batch size 1, and whether every prompt got the tokens it gets alone. The sizes take turns for ``--rounds`` rounds;
medians are printed, with the load average (the machine may be shared). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BUILTIN = ROOT / "resources" / "models" / "shakespeare-llama"
LINES = ["ROMEO:", "KING HENRY:", "What light through yonder window breaks?", "First Citizen:\nBefore we proceed",
         "O, she doth teach the torches to burn bright! It seems she hangs upon the cheek of night",
         "HAMLET:\nTo be, or not to be", "Now is the winter of our discontent made glorious summer",
         "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    os.environ["STUDIO_ONNX_THREADS"] = str(a.threads)
    import torch

    from engine.generators import Result
    from engine.plugins import DEFAULT_PLUGINS, PluginHost
    from engine.onnx_export import export_model
    from engine.store import ModelStore
    from plugins.text import _pipeline
    from plugins.text.pipeline import TextRequest
    from plugins.text.sampling import SamplingOptions

    torch.set_num_threads(a.threads)
    prompts = [LINES[i % len(LINES)] for i in range(a.prompts)]
    sizes = [int(s) for s in a.sizes.split(",")]
    reqs = [TextRequest(max_new_tokens=a.tokens, sampling=SamplingOptions(temperature=0.0), seed=i)
            for i in range(len(prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["STUDIO_HOME"] = tmp
        models = Path(tmp) / "models"
        shutil.copytree(BUILTIN, models / BUILTIN.name)
        host = PluginHost(safe_mode=True, disabled=[], builtins=DEFAULT_PLUGINS).load()
        store = ModelStore(host, builtin_dir=Path(tmp) / "none", user_dir=models)
        export_model(host, store.get(BUILTIN.name))
        entry = store.get(BUILTIN.name)
        rows = []
        for backend in ("torch", "onnx"):
            from engine.generators import Context, Request

            export = None
            if backend == "onnx":
                from engine.backends.runtime import choose_export
                export = choose_export(entry.path, gated_only=True, model_hash=entry.hash)
            pipe = _pipeline(Request(model=entry.ref(), backend=backend, device="cpu", export=export), Context())
            alone = None
            rates = {s: [] for s in sizes}
            same = {}
            for _ in range(a.rounds):
                for size in sizes:
                    t = time.perf_counter()
                    got = {i: e.token_ids for i, e in pipe.run_batch(prompts, reqs, batch_size=size)
                           if isinstance(e, Result)}
                    dt = time.perf_counter() - t
                    ids = [got[i] for i in range(len(prompts))]
                    alone = ids if size == 1 and alone is None else alone
                    rates[size].append(sum(map(len, ids)) / dt)
                    same[size] = same.get(size, True) and (alone is None or ids == alone)
            base = statistics.median(rates[sizes[0]])
            for size in sizes:
                r = statistics.median(rates[size])
                rows.append((backend, size, r, r / base, same[size]))
    load = os.getloadavg()
    print(f"Batched greedy generation, {BUILTIN.name}, {len(prompts)} prompts of different lengths, {a.tokens} new "
          f"tokens each, {a.threads} thread(s), medians of {a.rounds} rounds taking turns; load average "
          f"{load[0]:.2f} / {load[1]:.2f} (1 / 5 min; the machine is shared).\n")
    print("| backend | batch size | new tokens/s (all prompts) | speedup vs batch 1 | tokens as alone |")
    print("|---|---|---|---|---|")
    for backend, size, r, x, ok in rows:
        print(f"| {backend} | {size} | {r:.0f} | {x:.2f}x | {'yes' if ok else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
