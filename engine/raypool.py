"""Queue jobs on a Ray cluster: a pool of actors, each keeping its loaded models, fed from the submitting machine.

Ray is optional (``pip install -e '.[ray]'``) and imported only here, only when asked for. No shared filesystem
is assumed: a job's model folder travels through Ray's object store once per content hash (each worker keeps a
copy under its own cache folder, named by that hash) and input files (image, mask, LoRA files and adapter folders)
travel as bytes. A worker runs the job
with ``engine.runner.prepare``/``execute`` (the one generation path), writes nothing to its own history and sends
the output bytes back; the submitting machine writes the output file and the history row as each result
arrives (``record``), so a job is recorded once, by the submitter. A worker that dies mid-job is replaced and the
job is sent to another one.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from engine.errors import StudioError, UsageError
from engine.generators import digits

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("Ray is not installed; install it with pip install -e '.[ray]' (or pip install ray).") \
            from None
    return ray


def connect(address: str, num_cpus: Optional[int] = None):
    """Join the cluster at ``address`` (``auto``: the one RAY_ADDRESS names, else a local instance started here)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address != "auto":
        host, _, port = address.replace("ray://", "").rpartition(":")
        if not digits(port):
            raise UsageError(f"A Ray address is HOST:PORT or auto, not {address!r}.")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except OSError as exc:
            raise UsageError(f"The Ray cluster at {address} does not answer ({exc.strerror or exc}); nothing was "
                             "queued.") from None
    kwargs = {"num_cpus": num_cpus} if address == "auto" and num_cpus else {}
    try:
        ray.init(address=None if address == "auto" else address, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray's own errors, one line for people
        raise UsageError(f"Could not join the Ray cluster at {address}: {type(exc).__name__}: {exc}") from None
    return ray


def pack_folder(folder: Path) -> dict:
    """A model folder as {relative path: bytes} (what travels through the object store)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def pack_input(path: str) -> tuple:
    """An input file or folder (an image, a mask, a LoRA file or PEFT adapter folder) as (content hash, name,
    {path under its name: bytes}), which ``unpack_input`` writes again on a worker."""
    import hashlib

    path = Path(path).expanduser()
    files = {path.name: path.read_bytes()} if path.is_file() else {
        f"{path.name}/{rel}": data for rel, data in pack_folder(path).items()}
    h = hashlib.sha256()
    for rel, data in sorted(files.items()):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest(), path.name, files


def unpack_input(root: Path, packed: tuple) -> str:
    """The local path of a packed input under ``root`` (written once per content hash)."""
    digest, name, files = packed
    folder = Path(root) / "inputs" / digest
    if not (folder / name).exists():
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    return str(folder / name)


def ship_inputs(job: dict) -> tuple:
    """(the job without local input paths, its inputs as bytes): image, mask and LoRAs."""
    from engine.runner import split_lora

    inputs = {key: pack_input(job[key]) for key in ("image", "mask") if job.get(key)}
    loras = []
    for spec in job.get("loras") or ():
        path, weight = split_lora(spec)
        loras.append((pack_input(path), weight))
    return {**job, "image": None, "mask": None, "loras": []}, {"files": inputs, "loras": loras}


def unship_inputs(job: dict, inputs: dict, root: Path) -> dict:
    """The job with its inputs written under ``root`` (a worker's folder) in place of the submitter's paths."""
    job = dict(job)
    for key, packed in inputs["files"].items():
        job[key] = unpack_input(root, packed)
    job["loras"] = [unpack_input(root, packed) + ("" if weight is None else f":{weight}")
                    for packed, weight in inputs["loras"]]
    return job


class Worker:
    """One actor: its own state folder and model cache; jobs run through the runner like anywhere else."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="studio-ray-"))
        os.environ["STUDIO_HOME"] = str(self.root / "home")
        os.environ.setdefault("STUDIO_TORCH_THREADS", "1")
        from engine.plugins import PluginHost
        from engine.store import ModelStore

        self.host = PluginHost().load()
        self.store = ModelStore(self.host)
        self.cache: dict = {}

    def pid(self) -> int:
        return os.getpid()

    def _model(self, name: str, digest: str, files) -> str:
        folder = self.root / "models" / digest / name
        complete = folder.parent / ".complete"  # beside the folder: the folder's hash must stay the model's
        if not complete.exists():
            for rel, data in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            complete.write_text(digest)
        return str(folder)

    def run(self, job: dict, model: Optional[tuple], inputs: dict) -> dict:
        """``model``: (name, hash, ObjectRef of its files) or None; ``inputs``: from ``ship_inputs``.
        Returns the recipe, what the generator makes (image, audio, text) and the output's bytes."""
        import ray

        from engine.generators import Context
        from engine.outputs import SUFFIXES
        from engine.runner import execute, prepare, queued_job

        job = unship_inputs(job, inputs, self.root)
        if model is not None:
            name, digest, ref = model
            job["model"] = self._model(name, digest, ray.get(ref))
        prep = prepare(self.host, self.store, queued_job(job))
        ext = "." + SUFFIXES.get(prep.generator.info.makes, "txt")
        out = self.root / "out" / f"job{ext}"
        record = execute(prep, Context(cache=self.cache), out_path=out, history=False)
        return {"recipe": record.recipe, "makes": prep.generator.info.makes, "data": out.read_bytes()}


class RayPool:
    """Runs engine.runner.Job dicts on ``workers`` actors. ``run(jobs, on_result)`` calls ``on_result(index,
    result)`` on this machine as results arrive, in any order; a job whose worker died is retried elsewhere."""

    def __init__(self, address: str, workers: int = 2, num_cpus: Optional[int] = None, store=None):
        self.ray = connect(address, num_cpus=num_cpus)
        self.remote = self.ray.remote(num_cpus=1, max_restarts=0)(Worker)
        self.actors = [self.remote.remote() for _ in range(max(1, workers))]
        self.store = store
        self._models: dict = {}  # model hash -> ObjectRef of its files
        self.retries = 0  # jobs sent again because their worker died

    def ship(self, job: dict, generator_families: bool, default_model) -> tuple:
        """(job without local paths, model to ship, inputs to ship)."""
        model = None
        if generator_families:
            entry = self.store.get(job["model"]) if job.get("model") else default_model
            if entry is not None:
                if entry.hash not in self._models:
                    self._models[entry.hash] = self.ray.put(pack_folder(entry.path))
                model = (entry.name, entry.hash, self._models[entry.hash])
        job, inputs = ship_inputs(job)
        return {**job, "model": None}, model, inputs

    def pids(self) -> list:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def run(self, items: list, on_result: Callable[[int, dict], None],
            on_error: Callable[[int, BaseException], None]) -> None:
        """``items``: [(job dict, model, inputs)] from ``ship``."""
        ray = self.ray
        pending = list(range(len(items)))
        attempts = [0] * len(items)
        busy: dict = {}  # ObjectRef -> (index, actor)
        idle = list(self.actors)
        while pending or busy:
            while pending and idle:
                i = pending.pop(0)
                actor = idle.pop(0)
                attempts[i] += 1
                busy[actor.run.remote(*items[i])] = (i, actor)
            done, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
            for ref in done:
                i, actor = busy.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the worker died: replace it, retry the job
                    log.warning("a Ray worker died during job %d; retrying it on another", i)
                    self.actors.remove(actor)
                    fresh = self.remote.remote()
                    self.actors.append(fresh)
                    idle.append(fresh)
                    if attempts[i] < MAX_ATTEMPTS:
                        self.retries += 1
                        pending.insert(0, i)
                    else:
                        on_error(i, exc)
                    continue
                except ray.exceptions.RayTaskError as exc:  # the job itself failed (bad input, a generator error)
                    idle.append(actor)
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    on_error(i, cause)
                    continue
                idle.append(actor)
                on_result(i, result)

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort
                pass


def local_inputs(recipe: dict, job: dict) -> dict:
    """A worker's recipe with its inputs named as on this machine (the worker's copies are in a folder that goes
    with it): the image and mask kept in this studio's state folder, the LoRAs at the paths the job gave."""
    from engine.recipe import keep_input
    from engine.runner import split_lora

    for key in ("image", "mask"):
        if recipe.get(key) and job.get(key):
            here = keep_input(Path(job[key]).expanduser())
            if here["sha256"] == recipe[key].get("sha256"):
                recipe[key] = here
    loras = [str(Path(split_lora(spec)[0]).expanduser().resolve()) for spec in job.get("loras") or ()]
    if loras and len(loras) == len(recipe.get("loras") or ()):
        recipe["loras"] = [{**entry, "path": path} for entry, path in zip(recipe["loras"], loras)]
    return recipe


def record(queue, job_id: int, result: dict, history, out_dir: Path) -> dict:
    """Write a Ray worker's result on this machine: the output under the queue job's name and the history row
    tagged with the job. Returns the ``finished`` message (the caller marks the job done)."""
    from engine.jobsave import TaggedHistory, output_path
    from engine.outputs import atomic_write_bytes, sha256_file

    recipe = local_inputs(dict(result["recipe"]), queue.get(job_id).job)
    tag = queue.tag(job_id)
    path = atomic_write_bytes(output_path(out_dir, tag, recipe["generator"], result["makes"]), result["data"])
    recipe["path"] = str(path.resolve())
    recipe["worker"] = "ray"
    history_id = TaggedHistory(history, tag).add(recipe, [{"path": str(path.resolve()), "sha256": sha256_file(path)}])
    recipe["history_id"] = history_id
    return {"type": "finished", "recipe": recipe, "files": [str(path)], "history_id": history_id}


def run_queue_batch(queue, batch: str, pool: RayPool, host, store, history, out_dir: Path,
                    progress: Optional[Callable[[int, int], None]] = None) -> tuple:
    """Run every queued job of ``batch`` on the pool. Returns (done ids, failed ids)."""
    from engine.errors import describe_exception

    claimed = []
    while (job := queue.claim(batch=batch)) is not None:
        claimed.append(job)
    items = []
    for job in claimed:
        gen = host.generator(job.job["generator"])
        default = store.default_for(gen.info.id) if gen.info.families else None
        items.append(pool.ship(job.job, bool(gen.info.families), default))
    done, failed = [], []

    def on_result(i: int, result: dict) -> None:
        finished = record(queue, claimed[i].id, result, history, out_dir)
        queue.finish(claimed[i].id, finished["history_id"],
                     {"files": finished["files"], "text": finished["recipe"].get("text"),
                      "content_sha256": finished["recipe"].get("content_sha256")})
        done.append(claimed[i].id)
        if progress:
            progress(len(done) + len(failed), len(claimed))

    def on_error(i: int, exc: BaseException) -> None:
        message, _ = describe_exception(exc) if isinstance(exc, StudioError) else (f"{type(exc).__name__}: {exc}", "")
        queue.fail(claimed[i].id, message, type(exc).__name__)
        failed.append(claimed[i].id)
        if progress:
            progress(len(done) + len(failed), len(claimed))

    started = time.monotonic()
    pool.run(items, on_result, on_error)
    log.info("ray batch %s: %d done, %d failed in %.1f s", batch, len(done), len(failed), time.monotonic() - started)
    return done, failed


class RayExecutor:
    """A QueueWorker executor that runs each job on the pool (``studio serve --ray``): no token streaming, and a
    cancel takes effect only before the job is sent."""

    def __init__(self, pool: RayPool, queue, host, store, history, out_dir_fn: Callable[[], Path]):
        self.pool, self.queue, self.host, self.store = pool, queue, host, store
        self.history, self.out_dir_fn = history, out_dir_fn

    def __call__(self, qjob, token, report) -> dict:
        from engine.errors import GenerationError

        token.raise_if_cancelled()
        gen = self.host.generator(qjob.job["generator"])
        default = self.store.default_for(gen.info.id) if gen.info.families else None
        item = self.pool.ship(qjob.job, bool(gen.info.families), default)
        out: dict = {}
        self.pool.run([item], lambda i, r: out.update(result=r), lambda i, e: out.update(error=e))
        if "error" in out:
            err = out["error"]
            raise err if isinstance(err, StudioError) else GenerationError(f"{type(err).__name__}: {err}")
        return record(self.queue, qjob.id, out["result"], self.history, self.out_dir_fn())
