"""Batch throughput: images per second in-process vs on a local Ray instance with 1 and 2 workers, and Ray's
per-job overhead in milliseconds.

    .venv/bin/python benchmarks/batch_scaling.py [--images 24] [--steps 4] [--tiny 20]

Every batch goes through the studio's queue, outputs and history (the same code as `studio batch`, with and
without --ray). Models are warmed up first (one job per worker), so the rates are steady state. The per-job
overhead is the Ray time per job minus the in-process time per job on a 1-token text job with 1 worker (where
generation is nearly free). Needs Ray (pip install -e '.[ray]'). Prints a Markdown table.
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
    images = [Job("image", prompt="a large red circle in the center on a white background", seed=i,
                  options={"steps": args.steps}) for i in range(args.images)]
    tiny = [Job("text", prompt="KING:", seed=i, options={"max_new_tokens": 1}) for i in range(args.tiny)]

    def in_process(jobs) -> float:
        executor = InProcessExecutor(host, store)
        batch = uuid.uuid4().hex
        queue.submit_many(jobs[:1], batch=batch + "w")
        QueueWorker(queue, executor, batch=batch + "w").run(until_empty=True)  # load the model
        queue.submit_many(jobs, batch=batch)
        t = time.perf_counter()
        QueueWorker(queue, executor, batch=batch).run(until_empty=True)
        return time.perf_counter() - t

    def on_ray(pool, jobs) -> float:
        warm = uuid.uuid4().hex
        queue.submit_many(jobs[:len(pool.actors)], batch=warm)  # one per actor, models loaded everywhere
        run_queue_batch(queue, warm, pool, host, store, History(), out_dir)
        batch = uuid.uuid4().hex
        queue.submit_many(jobs, batch=batch)
        t = time.perf_counter()
        done, failed = run_queue_batch(queue, batch, pool, host, store, History(), out_dir)
        assert not failed and len(done) == len(jobs)
        return time.perf_counter() - t

    rows = []
    local_img = in_process(images)
    local_tiny = in_process(tiny)
    rows.append(("in-process", args.images / local_img, 1000 * local_tiny / args.tiny, ""))
    for workers in (1, 2):
        pool = RayPool("auto", workers=workers, num_cpus=2, store=store)
        try:
            t_img = on_ray(pool, images)
            t_tiny = on_ray(pool, tiny)
        finally:
            pool.close()
        overhead = 1000 * (t_tiny / args.tiny - local_tiny / args.tiny)
        rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''}", args.images / t_img,
                     1000 * t_tiny / args.tiny, f"{overhead:.1f}" if workers == 1 else ""))
    import ray

    ray.shutdown()
    print(f"{args.images} images of the built-in image model ({args.steps} steps, 32x32), {args.tiny} one-token "
          f"text jobs; {os.cpu_count()} cores\n")
    print("| run | images/s | ms per 1-token job | Ray overhead per job (ms) |\n|---|---|---|---|")
    base = rows[0][1]
    for name, rate, tiny_ms, overhead in rows:
        print(f"| {name} | {rate:.2f} ({rate / base:.2f}x) | {tiny_ms:.1f} | {overhead} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
