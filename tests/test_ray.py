"""Batches on a local Ray instance with two workers: the same outputs as in-process, and a killed worker loses
nothing. Skipped when Ray is not installed (pip install -e '.[ray]')."""
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from engine.history import History  # noqa: E402
from engine.jobqueue import JobQueue  # noqa: E402
from engine.jobworker import InProcessExecutor, QueueWorker  # noqa: E402
from engine.plugins import PluginHost  # noqa: E402
from engine.raypool import RayPool, run_queue_batch  # noqa: E402
from engine.runner import Job  # noqa: E402
from engine.store import ModelStore  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle")


def _pictures(folder, n):
    import random

    from PIL import Image

    folder.mkdir()
    paths = []
    for i in range(n):
        rng = random.Random(i)
        im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        im.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(16), rng.randrange(16), 24, 24))
        paths.append(folder / f"{i:03d}.png")
        im.save(paths[-1])
    return paths


def test_ray_batch_matches_in_process_and_survives_a_killed_worker(studio_home, tmp_path):
    host = PluginHost().load()
    store = ModelStore(host)
    jobs = [Job("image", prompt=f"a large {COLOURS[i % 5]} {SHAPES[i % 3]} in the center on a white background",
                seed=i, options={"steps": 2}) for i in range(40)]
    jobs += [Job("caption", image=str(p), options={"max_new_tokens": 12}) for p in _pictures(tmp_path / "pics", 200)]
    queue = JobQueue()
    local_ids = queue.submit_many(jobs, batch="local")
    QueueWorker(queue, InProcessExecutor(host, store), batch="local").run(until_empty=True)
    local = [queue.get(i).result["content_sha256"] for i in local_ids]

    pool = RayPool("auto", workers=2, num_cpus=2, store=store)
    try:
        remote_ids = queue.submit_many(jobs, batch="ray")
        victim = pool.pids()[0]
        killed = []

        def progress(n, total):
            if n == 15 and not killed:
                os.kill(victim, signal.SIGKILL)  # a worker dies mid-batch
                killed.append(n)

        done, failed = run_queue_batch(queue, "ray", pool, host, store, History(),
                                       studio_home / "outputs", progress)
        assert killed and pool.retries >= 1
    finally:
        pool.close()
        ray.shutdown()
    assert failed == [] and sorted(done) == remote_ids
    assert [queue.get(i).result["content_sha256"] for i in remote_ids] == local  # identical content
    tags = [e.recipe["queue_job"] for e in History().list(limit=1000)]
    assert len(tags) == 480 and len(set(tags)) == 480  # every job recorded exactly once
    for i in remote_ids[:3] + remote_ids[-3:]:
        assert os.path.exists(queue.get(i).result["files"][0])


def test_ray_address_that_does_not_answer_is_one_line(studio_home, tmp_path, capsys):
    from studio.cli import main

    jobfile = tmp_path / "jobs.jsonl"
    jobfile.write_text('{"generator": "text", "prompt": "KING:", "options": {"max_new_tokens": 2}}\n')
    assert main(["batch", str(jobfile), "--ray", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not answer" in err[0]
    assert JobQueue().list() == []  # nothing queued, nothing lost


def test_serve_with_a_ray_address_that_does_not_answer(studio_home, capsys):
    from studio.cli import main

    assert main(["serve", "--port", "7998", "--ray", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not answer" in err[0]
