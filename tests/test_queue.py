"""The persistent job queue: ordering, pause, cancel, retry, grids, and surviving a SIGKILL."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.history import History
from engine.jobqueue import JobQueue
from engine.jobsave import TaggedHistory
from engine.jobworker import InProcessExecutor, QueueWorker, recover
from engine.plugins import PluginHost
from engine.runner import Job
from engine.store import ModelStore
from tests.plugin_samples import GOOD, PIXELS, SLOW, drop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(queue, **kw):
    host = PluginHost().load()
    return QueueWorker(queue, InProcessExecutor(host, ModelStore(host)), **kw)


def test_order_move_front_pause_cancel_retry(studio_home):
    q = JobQueue()
    ids = [q.submit(Job("upper", prompt=p)) for p in ("a", "b", "c", "d")]
    assert [j.id for j in q.list()] == ids
    q.move(ids[3], 1)
    q.to_front(ids[2])
    assert [j.id for j in q.list()] == [ids[2], ids[0], ids[3], ids[1]]
    assert q.cancel(ids[1]) == "cancelled"
    with pytest.raises(UsageError, match="already finished"):
        q.cancel(ids[1])
    with pytest.raises(UsageError, match="not waiting"):
        q.move(ids[1], 0)
    q.set_paused(True)
    assert q.claim() is None
    q.set_paused(False)
    assert q.claim().id == ids[2]
    q.retry(ids[1])
    assert [j.id for j in q.list(states=("queued",))] == [ids[0], ids[3], ids[1]]
    with pytest.raises(UsageError, match="no job 999"):
        q.get(999)
    # the queue is a file: another JobQueue (another process) sees the same
    assert [j.id for j in JobQueue().list(states=("queued",))] == [ids[0], ids[3], ids[1]]


def test_worker_runs_records_and_fails_cleanly(studio_home):
    drop(studio_home, "good", GOOD)
    q = JobQueue()
    ok = q.submit(Job("upper", prompt="hi", options={"repeat": 2}))
    bad = q.submit(Job("upper", prompt="hi", options={"repeat": 9}))
    unknown = q.submit(Job("nope", prompt="hi"))
    w = _worker(q)
    assert w.run(until_empty=True) == 3
    done = q.get(ok)
    assert done.state == "done" and done.result["text"] == "HI HI"
    assert History().get(done.history_id).recipe["queue_job"] == q.tag(ok)
    assert q.get(bad).state == "failed" and "repeat" in q.get(bad).error
    assert q.get(unknown).state == "failed" and q.get(unknown).error_type == "UsageError"
    q.retry(bad)
    assert q.get(bad).state == "queued"


def test_cancel_running_job_from_another_handle(studio_home):
    drop(studio_home, "slow", SLOW)
    q = JobQueue()
    a = q.submit(Job("slow", prompt="x", options={"steps": 200, "delay": 0.05}))
    b = q.submit(Job("slow", prompt="y", options={"steps": 1, "delay": 0.05}))
    w = _worker(q).start()
    try:
        deadline = time.monotonic() + 20
        while q.get(a).state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert JobQueue().cancel(a) == "cancelling"
        while q.get(b).state != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.stop()
    assert q.get(a).state == "cancelled"
    assert q.get(b).state == "done"  # the queue went on
    assert len(History().list()) == 1


def test_grid_makes_every_cell_and_a_contact_sheet(studio_home):
    from PIL import Image

    drop(studio_home, "pixels", PIXELS)
    q = JobQueue()
    grid, ids = q.submit_grid(Job("pixels", prompt="p"), ["one", "two"], [1, 2, 3], {"size": [4, 8]})
    assert len(ids) == 12
    _worker(q).run(until_empty=True)
    jobs = q.grid_jobs(grid)
    assert all(j.state == "done" for j in jobs)
    recipes = {(j.job["prompt"], j.job["seed"], j.job["options"]["size"]) for j in jobs}
    assert len(recipes) == 12
    sheet = q.grid(grid)["sheet"]
    with Image.open(sheet) as im:
        assert im.width == 2 * 160  # columns: the two sizes
    with pytest.raises(UsageError, match="at most two"):
        q.submit_grid(Job("pixels", prompt="p"), [], [], {"a": [1], "b": [2], "c": [3]})


def test_a_grids_sheet_follows_a_retried_cell_and_survives_a_clear(studio_home):
    """The sheet was made once, so a retried cell stayed 'cancelled' on it; `queue clear` between cells removed
    finished cells of a running grid, and the sheet lost their row."""
    drop(studio_home, "pixels", PIXELS)
    q = JobQueue()
    grid, ids = q.submit_grid(Job("pixels", prompt="p"), [], [1, 2], {"size": [4, 8]})
    q.cancel(ids[0])
    _worker(q).run(max_jobs=1)
    assert q.clear() == 0  # the grid is still running: its finished cells stay
    _worker(q).run(until_empty=True)
    first = Path(q.grid(grid)["sheet"]).stat().st_mtime_ns
    q.retry(ids[0])
    time.sleep(0.01)
    _worker(q).run(until_empty=True)
    assert q.get(ids[0]).state == "done" and Path(q.grid(grid)["sheet"]).stat().st_mtime_ns > first
    assert q.clear() == 4  # finished now: all of it may go


def test_recover_does_not_record_twice(studio_home):
    """A job whose history row was written just before the process died is marked done, not run again."""
    drop(studio_home, "good", GOOD)
    q = JobQueue()
    jid = q.submit(Job("upper", prompt="hi"))
    claimed = q.claim()
    with q._tx() as conn:  # as if claimed by a process that has since died
        conn.execute("UPDATE jobs SET owner = 'nohost:1' WHERE id = ?", (jid,))
    TaggedHistory(History(), q.tag(jid)).add({"generator": "upper", "prompt": "hi", "seed": 1}, [])
    assert recover(q) == []
    assert q.get(jid).state == "done" and q.get(jid).history_id is not None
    assert claimed.id == jid and _worker(q).run(until_empty=True) == 0
    assert len(History().list()) == 1


def test_a_running_worker_takes_back_the_job_of_a_worker_that_died(studio_home):
    """Two workers; one is killed mid-job: its job stayed 'running' (no process owning it) until the next worker
    started, although the other worker kept working the queue. Now the live worker queues it again and runs it; a
    job of another machine, or of a live process, is left alone."""
    import socket

    drop(studio_home, "good", GOOD)
    q = JobQueue()
    dead, elsewhere, alive = (q.submit(Job("upper", prompt=p)) for p in ("dead", "elsewhere", "alive"))
    for jid in (dead, elsewhere, alive):
        q.claim()
    owners = {dead: f"{socket.gethostname()}:999999999", elsewhere: "another-machine:1",
              alive: f"{socket.gethostname()}:{os.getppid()}"}
    with q._tx() as conn:
        for jid, owner in owners.items():
            conn.execute("UPDATE jobs SET owner = ? WHERE id = ?", (owner, jid))
    assert _worker(q).run(until_empty=True) == 1
    assert q.get(dead).state == "done" and History().list()[0].prompt == "dead"
    assert q.get(elsewhere).state == "running" and q.get(alive).state == "running"


def test_sigkill_with_three_queued_and_one_running(studio_home):
    drop(studio_home, "slow", SLOW)
    q = JobQueue()
    ids = [q.submit(Job("slow", prompt=f"job{i}", seed=i, options={"steps": 30, "delay": 0.05})) for i in range(4)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "studio.cli", "queue", "run"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            first = q.get(ids[0])
            if first.state == "running" and first.step >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker never started the first job: " + proc.stderr.read1().decode())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [q.get(i).state for i in ids] == ["running", "queued", "queued", "queued"]
    assert History().list() == []
    partial = studio_home / "outputs" / f"queue-{q.token}-{ids[0]}-slow.txt"
    partial.parent.mkdir(exist_ok=True)
    partial.write_text("half")  # what a dying process could leave behind
    assert recover(q) == [ids[0]]  # what the next studio does first
    assert not partial.exists() and q.get(ids[0]).state == "queued"
    out = subprocess.run(cmd + ["--until-empty"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [q.get(i).state for i in ids] == ["done"] * 4
    assert q.get(ids[0]).attempts == 2
    rows = History().list()
    assert sorted(r.recipe["queue_job"] for r in rows) == sorted(q.tag(i) for i in ids)  # each exactly once
    assert partial.read_text() == "." * 30


def test_export_and_finetune_jobs(studio_home, monkeypatch):
    import engine.onnx_export

    calls = []

    def fake_export(host, entry, quantize=None, force=False, log=None):
        calls.append((entry.name, quantize))
        log("exporting")
        return {"folder": "/tmp/x"}

    monkeypatch.setattr(engine.onnx_export, "export_model", fake_export)
    q = JobQueue()
    e = q.submit({"model": "shakespeare-llama", "quantize": "int8"}, kind="export")
    f = q.submit({"kind": "nope", "args": []}, kind="finetune")
    g = q.submit(Job("text", prompt="KING:", options={"max_new_tokens": 1}))
    with pytest.raises(UsageError, match="needs a model"):
        q.submit({}, kind="export")
    assert q.claim(kinds=("generate",)).id == g  # what the window takes: generations only
    q.release(g)
    _worker(q).run(until_empty=True)
    assert calls == [("shakespeare-llama", "int8")] and q.get(e).state == "done"
    assert q.get(e).label == "export shakespeare-llama (int8)"
    assert q.get(f).state == "failed" and "Unknown fine-tuning kind" in q.get(f).error
    assert q.get(g).state == "done"


def test_job_files_and_the_api_take_every_job_field(tmp_path):
    """An inpainting job (image + mask) from a job file: ``mask`` was missing from the keys a job file and the
    /api/jobs endpoint accepted; both now take the Job's own fields (the replay-only ``export`` and ``threads`` aside)."""
    from dataclasses import fields

    from engine.runner import JOB_KEYS, REPLAY_ONLY, Job
    from studio.queue_cli import read_jobfile

    assert set(JOB_KEYS) == {f.name for f in fields(Job)} - set(REPLAY_ONLY)
    jobfile = tmp_path / "jobs.jsonl"
    jobfile.write_text('{"generator": "sd", "prompt": "a cat", "image": "room.png", "mask": "mask.png", "seed": 1}\n')
    jobs, errors = read_jobfile(jobfile)
    assert errors == [] and jobs[0][1].mask == "mask.png"


@pytest.mark.parametrize("line, words", [
    ('{"generator": "text", "prompt": "x", "seed": "abc"}', "seed must be a whole number"),
    ('{"generator": "text", "prompt": "x", "seed": true}', "seed must be a whole number"),
    ('{"generator": "text", "prompt": "x", "seed": 2.5}', "seed must be a whole number"),
    ('{"generator": "text", "prompt": "x", "options": "abc"}', "options must be an object"),
    ('{"generator": "text", "prompt": "x", "loras": "a.safetensors"}', "loras must be a list"),
    ('{"generator": "text", "prompt": "x", "loras": [5]}', "loras must be a list"),
    ('{"generator": "text", "prompt": "x", "model": ["a"]}', "model must be a string"),
    ('{"generator": "text", "prompt": 5}', "prompt must be a string"),
    ('{"generator": "chat", "messages": "hi"}', "messages must be a list"),
    ('{"prompt": "x"}', "needs a generator"),
    ('[1, 2]', "A job is a JSON object"),
    ('{"generator": "text", "colour": "red"}', "Unknown job field(s) colour"),
])
def test_a_job_of_the_wrong_types_is_one_sentence(tmp_path, line, words):
    """The fields of a job file's line and of POST /api/jobs are checked by type (a string seed, options or a
    model list failed as a TypeError / AttributeError, a 500 from the server; a string of LoRAs was read letter by
    letter)."""
    from engine.runner import job_from_dict
    from studio.queue_cli import read_jobfile

    with pytest.raises(UsageError) as info:
        job_from_dict(json.loads(line))
    assert words in str(info.value)
    assert job_from_dict({"generator": "text", "prompt": "x", "seed": None, "options": None, "loras": None,
                          "backend": None}) == Job("text", prompt="x")  # null is a field left out
    jobfile = tmp_path / "jobs.jsonl"
    jobfile.write_text(line + "\n")
    jobs, errors = read_jobfile(jobfile)
    assert jobs == [] and len(errors) == 1 and "line 1: " in errors[0] and words in errors[0]


def test_one_list_of_image_files_for_every_folder_of_images(tmp_path):
    """Captioning a folder, the queue's --folder and a fine-tuning dataset take the same images (the queue and
    the datasets used to pass over the .gif files that captioning a folder wrote captions for)."""
    from PIL import Image

    from engine.caption_folder import plan_folder
    from engine.datasets import read_pairs
    from studio.queue_cli import folder_images

    for name in ("a.png", "b.gif", "c.webp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a red circle\n")
    (tmp_path / "notes.md").write_text("not an image\n")
    names = ["a.png", "b.gif", "c.webp"]
    assert [Path(p).name for p in folder_images(tmp_path)] == names
    assert [p.name for p, _ in read_pairs(tmp_path)[0]] == names
    assert sorted(p.name for p in plan_folder(tmp_path, overwrite=True).todo) == names


def test_ray_jobs_carry_every_input_file(tmp_path):
    """A job sent to a Ray worker (no shared filesystem) carries its image, its mask and its LoRAs (a file with a
    weight, a PEFT folder) as bytes; the worker writes them under its own folder and runs the same job. The mask and
    the LoRAs kept the submitter's paths before, which do not exist on another machine."""
    from engine.raypool import ship_inputs, unship_inputs
    from engine.runner import adapter_ref

    (tmp_path / "in.png").write_bytes(b"png bytes")
    (tmp_path / "mask.png").write_bytes(b"mask bytes")
    (tmp_path / "style.safetensors").write_bytes(b"lora bytes")
    peft = tmp_path / "my-adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"peft bytes")
    job = {"generator": "sd", "prompt": "a cat", "image": str(tmp_path / "in.png"), "mask": str(tmp_path / "mask.png"),
           "loras": [str(tmp_path / "style.safetensors") + ":0.8", str(peft)], "seed": 1}
    sent, inputs = ship_inputs(job)
    assert sent["image"] is None and sent["mask"] is None and sent["loras"] == [] and sent["seed"] == 1
    worker = tmp_path / "worker"
    got = unship_inputs(sent, inputs, worker)
    assert Path(got["image"]).read_bytes() == b"png bytes" and Path(got["mask"]).read_bytes() == b"mask bytes"
    assert all(str(worker) in p for p in (got["image"], got["mask"], *got["loras"]))
    here, there = [adapter_ref(s) for s in job["loras"]], [adapter_ref(s) for s in got["loras"]]
    assert [(a.name, a.sha256, a.weight) for a in here] == [(a.name, a.sha256, a.weight) for a in there]
    assert unship_inputs(sent, inputs, worker) == got  # written once per content
    # the recipe the worker sends back names this machine's files, so a replay here finds them (the worker's
    # copies go with it)
    from engine.raypool import local_inputs
    from engine.recipe import keep_input

    theirs = {key: {**keep_input(Path(got[key])), "path": "/elsewhere/x.png", "kept": "/elsewhere/k.png"}
              for key in ("image", "mask")}
    recipe = local_inputs({**theirs, "loras": [a.to_dict() for a in there]}, job)
    assert recipe["image"]["path"] == str((tmp_path / "in.png").resolve()) and Path(recipe["mask"]["kept"]).is_file()
    assert [entry["path"] for entry in recipe["loras"]] == [str(tmp_path / "style.safetensors"), str(peft)]
    assert local_inputs({"text": "x"}, {"generator": "text"}) == {"text": "x"}


def test_a_dead_workers_cancelled_job_and_a_dead_servers_jobs_are_not_run_again(studio_home, capsys):
    """A running job whose cancel was asked for ran again after its worker died (its cancel flag was cleared); jobs
    a killed server had queued for its clients ran later for nobody, and `queue run --until-empty` left them
    queued without a word."""
    from engine.jobsave import server_pin

    drop(studio_home, "good", GOOD)
    q = JobQueue()
    dead = f"{socket.gethostname()}:999999999"
    asked = q.submit(Job("upper", prompt="stop me"))
    q.claim()
    q.cancel(asked)  # "cancelling": its worker is to stop it ...
    waiting = q.submit(Job("upper", prompt="for a client"), source="api", pin=server_pin(dead))
    running = q.submit(Job("upper", prompt="for a client too"), source="api", pin=server_pin(dead))
    live = q.submit(Job("upper", prompt="for a live server"), source="api",
                    pin=server_pin(f"{socket.gethostname()}:{os.getppid()}"))  # (a process that is alive)
    with q._tx() as conn:  # ... but it dies, as does the server of the other two
        conn.execute("UPDATE jobs SET owner = ? WHERE id = ?", (dead, asked))
        conn.execute("UPDATE jobs SET state = 'running', owner = ? WHERE id = ?", (dead, running))
    assert recover(q) == []
    assert [q.get(i).state for i in (asked, waiting, running, live)] == ["cancelled"] * 3 + ["queued"]
    assert "server it was sent to stopped" in q.get(waiting).message
    from studio.cli import main

    assert main(["queue", "run", "--until-empty"]) == 0
    assert q.get(live).state == "queued" and f"job(s) {live} are left to the worker" in capsys.readouterr().err


def test_ctrl_c_in_a_worker_puts_its_job_back(studio_home):
    """Ctrl+C on `studio queue run` marked the running job failed ('KeyboardInterrupt: ', with a traceback)."""
    from tests.plugin_samples import generator_plugin

    drop(studio_home, "interrupted", generator_plugin('''
INFO = GeneratorInfo(id="ctrlc", title="Ctrl+C", description="Is interrupted.", takes=("text",), makes="text")

def generate(request, context):
    raise KeyboardInterrupt
'''))
    q = JobQueue()
    jid = q.submit(Job("ctrlc", prompt="x"))
    with pytest.raises(KeyboardInterrupt):
        _worker(q).run_one()
    job = q.get(jid)
    assert job.state == "queued" and job.error == ""


def test_release_cancels_a_job_asked_to_stop_and_retry_unpins_a_servers_job(studio_home):
    from engine.jobsave import server_pin

    drop(studio_home, "good", GOOD)
    q = JobQueue()
    asked = q.submit(Job("upper", prompt="x"))
    q.claim()
    q.cancel(asked)
    q.release(asked)  # Ctrl+C while the cancel was on its way: it put the job back, cancel forgotten
    assert q.get(asked).state == "cancelled"
    dead = f"{socket.gethostname()}:999999999"
    served = q.submit(Job("upper", prompt="y"), source="api", pin=server_pin(dead))
    recover(q)
    assert q.get(served).state == "cancelled"
    q.retry(served)  # the user's retry: any worker runs it now (the next sweep cancelled it again)
    assert q.get(served).pin == "" and recover(q, sweep=True) == [] and q.get(served).state == "queued"
    assert _worker(q).run(until_empty=True) == 1 and q.get(served).state == "done"
    mine = q.submit(Job("upper", prompt="z"), source="api", pin=server_pin(q.owner))
    recover(q)  # a server started again with the dead one's host and pid (a restarted container)
    assert q.get(mine).state == "cancelled"


def test_a_job_whose_worker_died_twice_is_failed_not_run_a_third_time(studio_home):
    """A job that kills its worker (a crash, a plugin's os._exit from native code) was queued again after every
    restart and killed every `queue run` and `serve` that took it; the jobs after it never ran."""
    import sqlite3

    q = JobQueue()
    bad = q.submit(Job("upper", prompt="x"), source="cli")
    q.submit(Job("upper", prompt="y"), source="cli")
    for _ in range(2):  # claimed, then its worker dies (what recovery after a restart puts back)
        assert q.claim().id == bad
        with sqlite3.connect(q.path) as conn:
            conn.execute("UPDATE jobs SET state = 'queued', owner = '' WHERE id = ?", (bad,))
    nxt = q.claim()
    assert nxt.id != bad
    failed = q.get(bad)
    assert failed.state == "failed" and "its worker process ended while running it 2 times" in failed.error
    q.retry(bad)  # a retry runs it once more
    q.release(nxt.id)
    assert q.claim().id == nxt.id
    assert q.claim().id == bad
    q.release(bad)  # put back (Ctrl+C, the window closed) is no crash
    assert q.claim().id == bad
