"""`studio queue ...` and `studio batch ...`: the persistent job queue from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from engine.errors import StudioError, UsageError
from engine.jobqueue import FINISHED, JobQueue


def add_parsers(sub, parser_class) -> None:
    from studio.cli import LORA_HELP, MODEL_HELP, PROMPT_HELP, QUANTIZE, SEED_HELP, SET_HELP, add_backend_flags

    q = sub.add_parser("queue", help="the job queue: add, list, reorder, pause, resume, cancel, retry, run")
    qsub = q.add_subparsers(dest="action", required=True, parser_class=parser_class)
    x = qsub.add_parser("list")
    x.add_argument("--json", action="store_true")
    x.add_argument("--all", action="store_true", help="also the finished jobs")
    x = qsub.add_parser("add", help="queue generations (the options of `studio generate`, plus a grid)")
    x.add_argument("generator")
    x.add_argument("--prompt", metavar="TEXT", help=PROMPT_HELP)
    x.add_argument("--prompt-file", metavar="FILE", help="one job per non-empty line (the grid's prompts)")
    x.add_argument("--image", action="append", default=[], metavar="PATH")
    x.add_argument("--mask", metavar="PATH", help="inpainting mask for --image (white = repaint, black = keep)")
    x.add_argument("--folder", metavar="DIR", help="one job per image in DIR (captioning a folder)")
    x.add_argument("--model", metavar="NAME|PATH", help=MODEL_HELP)
    add_backend_flags(x)
    x.add_argument("--seed", type=int, metavar="N", help=SEED_HELP)
    x.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help=LORA_HELP)
    x.add_argument("--messages", metavar="FILE.json", help="a conversation for `chat` (as `studio generate chat`)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help=SET_HELP)
    x.add_argument("--front", action="store_true", help="run it next")
    x.add_argument("--seeds", metavar="N,N,...", help="grid: one job per seed")
    x.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2,...",
                   help="grid: one job per value of an option (at most two); a contact sheet at the end")
    x.add_argument("--json", action="store_true")
    x = qsub.add_parser("export", help="queue an ONNX export (as `studio export-onnx`)")
    x.add_argument("model")
    x.add_argument("--quantize", choices=QUANTIZE)
    x.add_argument("--force", action="store_true")
    x = qsub.add_parser("finetune", help="queue a LoRA fine-tune (as `studio finetune KIND ...`)")
    x.add_argument("kind")
    x.add_argument("args", nargs=argparse.REMAINDER)
    for verb, helptext in (("cancel", "cancel a job (a running one stops at its next step)"),
                           ("retry", "queue a failed or cancelled job again"),
                           ("front", "move a queued job to the front"), ("show", "one job in full")):
        x = qsub.add_parser(verb, help=helptext)
        x.add_argument("id", type=int)
    x = qsub.add_parser("move", help="move a queued job to a place in the queue (0 = next)")
    x.add_argument("id", type=int)
    x.add_argument("position", type=int)
    qsub.add_parser("pause", help="hand out no more jobs (the running one finishes)")
    qsub.add_parser("resume")
    qsub.add_parser("clear", help="forget the finished jobs (outputs and history stay)")
    x = qsub.add_parser("run", help="work the queue in this process")
    x.add_argument("--until-empty", action="store_true", help="stop when nothing is left to run")

    b = sub.add_parser("batch", help="run a JSON Lines file of jobs (or --prompt-file) through the queue")
    b.add_argument("jobfile", nargs="?", help="one JSON object per line: generator, prompt, image, model, seed, options")
    b.add_argument("--prompt-file", metavar="FILE", help="one generation per non-empty line (with --generator)")
    b.add_argument("--folder", metavar="DIR", help="one job per image in DIR (e.g. --generator caption)")
    b.add_argument("--generator", default="text", help="the generator of --prompt-file and --folder jobs "
                   "(default text)")
    b.add_argument("--model", metavar="NAME|PATH", help=MODEL_HELP)
    b.add_argument("--seed", type=int, metavar="N", help=SEED_HELP)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help=SET_HELP)
    b.add_argument("--ray", metavar="auto|ADDRESS", help="run on a Ray cluster (pip install -e '.[ray]')")
    b.add_argument("--workers", type=int, default=2, help="Ray actors (with --ray)")
    b.add_argument("--json", action="store_true", help="print one JSON object per finished job")


def _print_jobs(jobs: list, as_json: bool) -> None:
    from studio.commands import _print_json, _table

    if as_json:
        _print_json([j.to_dict() for j in jobs])
        return
    _table([(j.id, j.state + (" (cancelling)" if j.cancel and j.state == "running" else ""),
             f"{100 * j.progress:.0f}%", j.source or "-", j.label, *_varies(j), j.error[:60] or j.message[:40])
            for j in jobs], ["ID", "STATE", "DONE", "FROM", "JOB", "SEED", "GRID", "NOTE"])


def _varies(job) -> tuple:
    """(seed, grid cell) of a generation job as `queue list` shows them: what tells a grid's jobs apart (the grid's
    id and the values of its options in this cell)."""
    if job.kind != "generate":
        return "-", "-"
    seed = job.job.get("seed")
    if job.grid is None:
        return ("-" if seed is None else seed), "-"
    options = job.job.get("options") or {}
    values = " ".join(f"{k}={options.get(k)}" for k in job.cell if k not in ("prompt", "seed"))
    return ("-" if seed is None else seed), f"#{job.grid}" + (f" {values}" if values else "")


def _validate(host, store, jobs: list) -> None:
    from engine.runner import prepare

    for job in jobs:
        prepare(host, store, job)


def _grid_axes(specs: list) -> dict:
    axes = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--grid expects OPTION=V1,V2,..., not {spec!r}.")
        if key.strip() in axes:
            raise UsageError(f"--grid names {key.strip()} twice; give all its values once, as "
                             f"{key.strip()}=A,B,C.")
        axes[key.strip()] = [v for v in values.split(",") if v != ""]
    return axes


def cmd_queue(args) -> int:
    queue = JobQueue()
    a = args.action
    if a == "list":
        jobs = queue.list() if args.all else queue.list(states=("running", "queued"))
        _print_jobs(jobs, args.json)
        if not args.json and queue.paused():
            print("the queue is paused (`studio queue resume`)", file=sys.stderr)
    elif a == "show":
        print(json.dumps(queue.get(args.id).to_dict(), indent=2, sort_keys=True, default=str))
    elif a == "add":
        return _add(queue, args)
    elif a in ("export", "finetune"):
        from engine.store import ModelStore
        from studio.commands import _host

        host = _host()
        if a == "export":
            ModelStore(host).get(args.model)  # an unknown model is refused now, not when the job runs
            payload = {"model": args.model, "quantize": args.quantize, "force": args.force}
        else:
            host.trainer(args.kind, finetune=True)
            payload = {"kind": args.kind, "args": list(args.args)}
        print(f"queued job {queue.submit(payload, kind=a, source='cli')}")
    elif a == "cancel":
        print(f"job {args.id}: {queue.cancel(args.id)}")
    elif a == "retry":
        queue.retry(args.id)
        print(f"job {args.id}: queued again")
    elif a == "front":
        queue.to_front(args.id)
        print(f"job {args.id}: next to run")
    elif a == "move":
        queue.move(args.id, args.position)
        print(f"job {args.id}: moved to place {args.position}")
    elif a in ("pause", "resume"):
        queue.set_paused(a == "pause")
        print(f"queue {a}d")
    elif a == "clear":
        print(f"forgot {queue.clear()} finished job(s)")
    elif a == "run":
        return _run(queue, args.until_empty)
    return 0


def _add(queue: JobQueue, args) -> int:
    from engine import state
    from engine.generators import WHOLE
    from engine.runner import Job
    from engine.store import ModelStore
    from studio.commands import _host, _jobs, _print_json

    host = _host()
    store = ModelStore(host)
    args.image = list(args.image) + folder_images(args.folder)
    jobs = [absolute_inputs(j) for j in _jobs(args, state.load_settings())]
    if args.seeds or args.grid:
        parts = [p.strip() for p in args.seeds.split(",")] if args.seeds else []
        if not all(WHOLE.fullmatch(p) for p in parts):  # as people type them ("1_0" is not 10)
            raise UsageError(f"--seeds expects whole numbers separated by commas, not {args.seeds!r}.")
        seeds = [int(p) for p in parts]
        axes = _grid_axes(args.grid)
        base = jobs[0]
        prompts = [j.prompt for j in jobs] if args.prompt_file else []
        cells = [Job(**{**base.__dict__, "prompt": p, "seed": s, "options": {**base.options, **dict(zip(axes, v))}})
                 for p in (prompts or [base.prompt]) for s in (seeds or [base.seed])
                 for v in _product(list(axes.values()))]
        if len(axes) > 2:
            raise UsageError(f"A grid varies at most two options, not {len(axes)} ({', '.join(axes)}).")
        _validate(host, store, cells)
        grid, ids = queue.submit_grid(base, prompts, seeds, axes, source="cli")
        print(f"queued grid {grid}: jobs {ids[0]}-{ids[-1]} ({len(ids)}); a contact sheet follows the last one")
        return 0
    _validate(host, store, jobs)
    ids = [queue.submit(j, source="cli", front=args.front) for j in jobs]
    if args.json:
        _print_json({"ids": ids})
    else:
        print("queued job(s) " + ", ".join(map(str, ids)))
    return 0


def absolute_inputs(job):
    """``job`` with its input files (image, mask, LoRA files, a model folder given as a path) as absolute paths: the
    queue is worked from other folders (the window, the server, another terminal), where a relative path named
    another file or none."""
    from engine.runner import split_lora

    def absolute(path):
        return str(Path(path).expanduser().absolute()) if path else path

    def lora(spec):
        path, weight = split_lora(spec)
        return absolute(path) + (f":{weight}" if weight is not None else "")

    model = job.model
    if model and ("/" in model or model.startswith(("~", "."))):  # a path; a store name has no "/"
        model = absolute(model)
    job.image, job.mask, job.model = absolute(job.image), absolute(job.mask), model
    job.loras = [lora(x) for x in job.loras]
    return job


def folder_images(folder) -> list:
    """The images of a folder, sorted by name (a folder with none is a usage error)."""
    from engine.datasets import IMAGE_SUFFIXES

    if not folder:
        return []
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UsageError(f"{folder} is not a folder.")
    found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UsageError(f"Folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
    return found


def _product(lists: list) -> list:
    import itertools

    return list(itertools.product(*lists)) if lists else [()]


def _worker(queue: JobQueue, batch: str = ""):
    from engine.jobworker import InProcessExecutor, QueueWorker, recover
    from engine.store import ModelStore
    from studio.commands import _host

    host = _host()
    recover(queue)
    return QueueWorker(queue, InProcessExecutor(host, ModelStore(host)), batch=batch)


def _run(queue: JobQueue, until_empty: bool) -> int:
    worker = _worker(queue)
    if queue.paused():
        print("studio: warning: the queue is paused; `studio queue resume` lets it run", file=sys.stderr)
    while not worker.stop_event.is_set():
        job = worker.run_one()
        if job is None:
            if until_empty:
                left = [j.id for j in queue.list(states=("queued",)) if j.pin and j.pin != worker.pin]
                if left and not queue.paused():
                    print(f"studio: note: job(s) {', '.join(map(str, left[:10]))} are left to the worker they were "
                          "sent to (a `studio serve` or another batch).", file=sys.stderr)
                break
            time.sleep(worker.poll)
            continue
        out = (job.result or {}).get("files") or []
        print(f"job {job.id}: {job.state}" + (f" {out[0]}" if out else "") + (f" ({job.error})" if job.error else ""),
              flush=True)
        if job.grid is not None and all(j.state in FINISHED for j in queue.grid_jobs(job.grid)):
            sheet = queue.grid(job.grid)["sheet"]  # the worker wrote it when this last cell finished
            if sheet:
                print(f"grid {job.grid}: contact sheet {sheet}", flush=True)
    return 0


# ----- batch -------------------------------------------------------------------------------------
def read_jobfile(path: Path) -> tuple:
    """(jobs, errors): a JSON Lines file of jobs; each bad line is an error naming its line number."""
    from engine.runner import job_from_dict

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read job file {path} ({exc.strerror or exc}).") from None
    jobs, errors = [], []
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:  # a line that is not UTF-8 is that line's error; the others run (as every bad line)
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{path} line {n}: the line is not UTF-8 text.")
            continue
        if not line.strip():
            continue
        try:
            jobs.append((n, job_from_dict(json.loads(line))))
        except (ValueError, UsageError) as exc:
            errors.append(f"{path} line {n}: {exc}")
    return jobs, errors


def cmd_batch(args) -> int:
    from engine import state
    from engine.runner import Job, nth_seed
    from engine.store import ModelStore
    from studio.commands import _host, _parse_sets, read_prompt_file

    if sum(map(bool, (args.jobfile, args.prompt_file, args.folder))) != 1:
        raise UsageError("Give a job file, --prompt-file or --folder (one of them).")
    if args.ray and args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, not {args.workers}.")
    if args.jobfile:
        numbered, errors = read_jobfile(Path(args.jobfile))
    elif args.folder:
        settings, options = state.load_settings(), _parse_sets(args.sets)
        numbered = [(n, Job(args.generator, image=path, model=args.model, backend=settings.backend,
                            device=settings.device, seed=args.seed, options=options))
                    for n, path in enumerate(folder_images(args.folder), 1)]
        errors = []
    else:
        settings, options = state.load_settings(), _parse_sets(args.sets)
        numbered = [(n, Job(args.generator, prompt=prompt, model=args.model, backend=settings.backend,
                            device=settings.device, seed=nth_seed(args.seed, i),
                            options=options))
                    for i, (n, prompt) in enumerate(read_prompt_file(args.prompt_file))]
        errors = []
    numbered = [(n, absolute_inputs(job)) for n, job in numbered]  # any worker may take them, from any folder
    host = _host()
    store = ModelStore(host)
    from engine.runner import prepare

    good = []
    for n, job in numbered:
        try:
            prepare(host, store, job)
            good.append(job)
        except StudioError as exc:
            where = f"{args.jobfile or args.prompt_file} line {n}" if not args.folder else str(job.image)
            errors.append(f"{where}: {exc}")
    for e in errors:
        print(f"studio: error: {e}", file=sys.stderr)
    if not good:
        raise UsageError("No job in the batch can run." if errors else "The batch is empty.")
    pool = None
    if args.ray:  # join the cluster before anything is queued: an address that does not answer loses nothing
        from engine.raypool import RayPool

        pool = RayPool(args.ray, workers=args.workers, store=store)
    queue = JobQueue()
    batch = uuid.uuid4().hex[:12]
    ids = queue.submit_many(good, source="batch", batch=batch)
    if pool is not None:
        return _batch_on_ray(queue, batch, pool, host, store, ids, args.json, bool(errors))
    worker = _worker(queue, batch=batch)
    bar, failed = _BatchBar(len(ids)), 0
    from engine.jobworker import recover

    reported: set = set()
    last_recover = time.monotonic()
    while True:  # another worker (the window, `studio queue run`) may take some of the batch's jobs too
        ran = worker.run_one()
        jobs = queue.list(batch=batch)
        for job in jobs:
            if job.state in FINISHED and job.id not in reported:
                reported.add(job.id)
                bar.step()
                failed += job.state != "done"
                _report(job, args.json)
        if len(reported) == len(ids):
            break
        if ran is None:  # waiting on jobs another process runs; if it died, they come back to the queue
            time.sleep(worker.poll)
            if time.monotonic() - last_recover > 5:
                recover(queue)
                last_recover = time.monotonic()
    bar.done()
    print(f"batch {batch}: {len(ids) - failed} of {len(ids)} done", file=sys.stderr)
    return 1 if errors or failed else 0


def _report(job, as_json: bool) -> None:
    """A finished job of a batch: its error on stderr, else its JSON object (--json) or the path of its output (as
    `studio generate` prints an image's; a text's recipe file beside it is left out, as there)."""
    from studio.commands import _print_json

    if job.state != "done":
        print(f"studio: error: job {job.id} ({job.label}): {job.error or job.state}", file=sys.stderr)
    elif as_json:
        _print_json({"job": job.id, "history_id": job.history_id, **(job.result or {})})
    elif (job.result or {}).get("files"):
        print(job.result["files"][0], flush=True)


def _batch_on_ray(queue, batch, pool, host, store, ids, as_json: bool, had_errors: bool) -> int:
    from engine import state
    from engine.history import History
    from engine.raypool import run_queue_batch

    bar = _BatchBar(len(ids))
    try:
        done, failed = run_queue_batch(queue, batch, pool, host, store, History(), state.load_settings().outputs,
                                       progress=lambda n, total: bar.step())
    finally:
        pool.close()
    bar.done()
    for job in queue.list(batch=batch):
        _report(job, as_json)
    print(f"batch {batch}: {len(done)} of {len(ids)} done on Ray", file=sys.stderr)
    return 1 if had_errors or failed else 0


class _BatchBar:
    """done/total over the whole batch on stderr (a terminal only)."""

    def __init__(self, total: int):
        self.total, self.n, self.started = total, 0, time.monotonic()
        self.enabled = sys.stderr.isatty()

    def step(self) -> None:
        self.n += 1
        if self.enabled:
            rate = self.n / max(time.monotonic() - self.started, 1e-9)
            sys.stderr.write(f"\r{self.n}/{self.total} jobs, {rate:.2f}/s ")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
