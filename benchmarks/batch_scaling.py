"""Batch throughput: images per second in-process vs on a local Ray instance with 1 and 2 workers, and Ray's
per-job overhead in milliseconds.

    .venv/bin/python benchmarks/batch_scaling.py [--images 24] [--steps 4] [--tiny 20]

Every batch goes through the studio's queue, outputs and history (the same code as `studio batch`, with and
without --ray). Models are loaded on every worker first, so the rates are steady state; the three runs take
turns for --rounds rounds and the medians are printed. The per-job
overhead is the Ray time per job minus the in-process time per job on a 1-token text job with 1 worker (where
generation is nearly free), and, apart from any generation, the round trip of an actor call that does nothing. Needs Ray (pip install -e '.[ray]'). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tiny", type=int, default=20, help="1-token text jobs for the overhead row")
    p.add_argument("--rounds", type=int, default=3, help="turns of the three runs (medians are printed)")
    p.add_argument("--record-only", action="store_true",
                   help="only time what the submitting machine does per Ray result (no Ray needed)")
    args = p.parse_args(argv)
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ.setdefault("STUDIO_TORCH_THREADS", "1")
    from engine import state
    from engine.history import History
    from engine.jobqueue import JobQueue
    from engine.jobworker import InProcessExecutor, QueueWorker
    from engine.plugins import PluginHost
    from engine.raypool import RayPool, run_queue_batch
    from engine.runner import Job
    from engine.store import ModelStore

    host = PluginHost().load()
    store = ModelStore(host)
    queue = JobQueue()
    out_dir = state.load_settings().outputs
    if args.record_only:
        return record_cost(queue, out_dir)
    images = [Job("image", prompt="a large red circle in the center on a white background", seed=i,
                  options={"steps": args.steps}) for i in range(args.images)]
    tiny = [Job("text", prompt="KING:", seed=i, options={"max_new_tokens": 1}) for i in range(args.tiny)]

    def in_process(jobs, executor) -> float:
        batch = uuid.uuid4().hex
        queue.submit_many(jobs[:1], batch=batch + "w")
        QueueWorker(queue, executor, batch=batch + "w").run(until_empty=True)  # the model is loaded
        queue.submit_many(jobs, batch=batch)
        t = time.perf_counter()
        QueueWorker(queue, executor, batch=batch).run(until_empty=True)
        return time.perf_counter() - t

    def on_ray(pool, jobs) -> float:
        batch = uuid.uuid4().hex
        queue.submit_many(jobs, batch=batch)
        t = time.perf_counter()
        done, failed = run_queue_batch(queue, batch, pool, host, store, History(), out_dir)
        assert not failed and len(done) == len(jobs)
        return time.perf_counter() - t

    import statistics

    executor = InProcessExecutor(host, store)
    pools = {1: RayPool("auto", workers=1, num_cpus=3, store=store)}  # one instance, room for both pools
    pools[2] = RayPool("auto", workers=2, store=store)
    for pool in pools.values():
        on_ray(pool, images[:2])  # load the models on every actor
        on_ray(pool, tiny[:2])
    times: dict = {"local": [], 1: [], 2: []}
    tiny_times: dict = {"local": [], 1: [], 2: []}
    for _ in range(args.rounds):  # the three take turns, so a busy minute hits them alike
        times["local"].append(in_process(images, executor))
        tiny_times["local"].append(in_process(tiny, executor))
        for workers, pool in pools.items():
            times[workers].append(on_ray(pool, images))
            tiny_times[workers].append(on_ray(pool, tiny))
    actor, laps = pools[1].actors[0], []
    for _ in range(50):
        t = time.perf_counter()
        pools[1].ray.get(actor.pid.remote())
        laps.append(time.perf_counter() - t)
    noop_ms = 1000 * statistics.median(laps)
    for pool in pools.values():
        pool.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    tiny_med = {k: statistics.median(v) / args.tiny for k, v in tiny_times.items()}
    rows = [("in-process", args.images / med["local"], 1000 * tiny_med["local"], "")]
    for workers in (1, 2):
        overhead = 1000 * (tiny_med[workers] - tiny_med["local"])
        rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''}", args.images / med[workers],
                     1000 * tiny_med[workers], f"{overhead:.1f}" if workers == 1 else ""))
    rows.append(("Ray actor call that does nothing (median of 50)", None, noop_ms, f"{noop_ms:.1f}"))
    import ray

    ray.shutdown()
    print(f"{args.images} images of the built-in image model ({args.steps} steps, 32x32), {args.tiny} one-token "
          f"text jobs, medians of {args.rounds} rounds; {os.cpu_count()} cores\n")
    print("| run | images/s | ms per 1-token job | Ray overhead per job (ms) |\n|---|---|---|---|")
    base = rows[0][1]
    for name, rate, tiny_ms, overhead in rows:
        speed = f"{rate:.2f} ({rate / base:.2f}x)" if rate else "-"
        print(f"| {name} | {speed} | {tiny_ms:.1f} | {overhead} |")
    return 0


def record_cost(queue, out_dir, n: int = 100) -> int:
    """What the submitting machine does for each Ray result: write the output atomically, add the history row,
    mark the queue job done. Its inverse is the most results per second one submitter can take."""
    import io
    import statistics

    from PIL import Image

    from engine.history import History
    from engine.raypool import record
    from engine.runner import Job

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    result = {"recipe": {"generator": "image", "prompt": "x", "seed": 1, "content_sha256": "0"}, "suffix": ".png",
              "data": buf.getvalue()}
    history, laps = History(), []
    for job_id in queue.submit_many([Job("image", prompt="x")] * n, batch="record"):
        queue.claim(batch="record")
        t = time.perf_counter()
        finished = record(queue, job_id, result, history, out_dir)
        queue.finish(job_id, finished["history_id"], {"files": finished["files"]})
        laps.append(time.perf_counter() - t)
    laps.sort()
    print("| submitter, per result | median ms | 90th percentile ms | results/s at the median |\n|---|---|---|---|")
    print(f"| write output + history row + queue done | {1000 * statistics.median(laps):.1f} | "
          f"{1000 * laps[int(0.9 * n)]:.1f} | {1 / statistics.median(laps):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
