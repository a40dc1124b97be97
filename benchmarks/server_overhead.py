"""`studio serve` overhead: a one-token completion through HTTP vs the CLI's in-process generate, and requests
per second with 4 concurrent clients on the built-in text model.

    .venv/bin/python benchmarks/server_overhead.py [--requests 40] [--rounds 15]

The in-process row runs engine.runner.prepare + execute with the history (what `studio generate text` does once
its model is loaded). The HTTP rows start the real server (uvicorn, 127.0.0.1) and post /v1/completions with
max_tokens 1 through httpx; every request goes through the queue and the history. Prints a Markdown table with
medians, and how many requests failed (should be 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=40, help="requests for the 4-client row")
    p.add_argument("--rounds", type=int, default=15, help="single requests for the latency rows")
    args = p.parse_args(argv)
    os.environ.setdefault("STUDIO_HOME", tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ.setdefault("STUDIO_TORCH_THREADS", "1")
    import httpx
    import uvicorn

    from engine.history import History
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore
    from studio.server import create_app

    host = PluginHost().load()
    store = ModelStore(host)
    history, cache = History(), {}
    from engine.generators import Context

    def local_once() -> float:
        t = time.perf_counter()
        prep = prepare(host, store, Job("text", prompt="KING:", seed=1, options={"max_new_tokens": 1}))
        execute(prep, Context(cache=cache), history=history)
        return time.perf_counter() - t

    local_once()  # load the model
    local = statistics.median(local_once() for _ in range(args.rounds))

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": "KING:", "max_tokens": 1, "seed": 1}
    client = httpx.Client(timeout=120)

    def http_once(c=client) -> float:
        t = time.perf_counter()
        r = c.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t

    http_once()  # the server's worker loads the model
    http = statistics.median(http_once() for _ in range(args.rounds))
    failures = []

    def one(_):
        try:
            with httpx.Client(timeout=120) as c:
                return http_once(c)
        except Exception as exc:  # noqa: BLE001 - counted
            failures.append(exc)
            return None

    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t
    server.should_exit = True
    ok = [r for r in results if r is not None]
    print(f"built-in text model, one-token completions; {os.cpu_count()} cores\n")
    print("| path | median latency (ms) | requests/s | failed |\n|---|---|---|---|")
    print(f"| in-process prepare + execute (CLI) | {1000 * local:.1f} | {1 / local:.1f} | 0 |")
    print(f"| HTTP /v1/completions, 1 client | {1000 * http:.1f} ({http / local:.2f}x) | {1 / http:.1f} | 0 |")
    print(f"| HTTP /v1/completions, 4 clients | {1000 * statistics.median(ok):.1f} | {len(ok) / wall:.1f} | "
          f"{len(failures)} of {args.requests} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
