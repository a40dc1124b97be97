"""The `studio` subcommands. Each ``cmd_*`` takes parsed arguments and returns an exit status."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from engine import state
from engine.errors import StudioError, UsageError
from engine.generators import Progress
from engine.history import History
from engine.plugins import PluginHost, set_enabled
from engine.runner import Job, execute, nth_seed, prepare
from engine.store import ModelStore
from studio.out_target import out_target


def _host() -> PluginHost:
    return PluginHost().load()


def _print_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


def _table(rows: list, headers: list) -> None:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ----- generators and generate ---------------------------------------------------------------
def cmd_generators(args) -> int:
    host = _host()
    infos = [g.info for g, _ in host.generators.values()]
    if args.json:
        _print_json([dict(i.to_dict(), plugin=host.plugin_of(i.id)) for i in infos])
    else:
        _table([(i.id, i.title, "+".join(i.takes) + " -> " + i.makes, host.plugin_of(i.id), i.description)
                for i in infos], ["ID", "TITLE", "TAKES", "PLUGIN", "DESCRIPTION"])
    failed = [p.name for p in host.plugins.values() if p.status == "failed"]
    if failed:
        print(f"studio: warning: plugin(s) {', '.join(failed)} failed to load; see `studio plugins list`.",
              file=sys.stderr)
    return 0


def _parse_sets(sets: list) -> dict:
    out = {}
    for item in sets:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, not {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


class _ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self):
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()

    def __call__(self, event) -> None:
        if not self.enabled or not isinstance(event, Progress) or event.total <= 0:
            return
        frac = min(1.0, event.step / event.total)
        filled = int(frac * 30)
        elapsed = time.monotonic() - self.started
        left = elapsed / frac - elapsed if frac > 0 else 0
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {event.step}/{event.total} {left:4.0f}s left ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _prompt_from_caption(args, host, store, settings) -> str:
    """``--prompt-from-caption IMAGE``: caption the image (recorded in history like any caption) -> the prompt."""
    if args.prompt is not None or args.prompt_file:
        raise UsageError("Give --prompt, --prompt-file or --prompt-from-caption, not several.")
    if "caption" not in host.generators:
        raise UsageError("No caption generator is installed, so --prompt-from-caption cannot describe the image.")
    job = Job("caption", image=args.prompt_from_caption, model=args.caption_model,
              backend=args.backend or settings.backend, device=args.device or settings.device)
    record = execute(prepare(host, store, job), history=History())
    text = (record.recipe.get("text") or "").strip()
    if not text:
        raise UsageError(f"The captioner gave an empty caption for {args.prompt_from_caption}; give --prompt.")
    print(f"studio: prompt from caption: {text}", file=sys.stderr)
    return text


def read_prompt_file(path) -> list:
    """(line number, prompt) for each non-empty line of a UTF-8 text file, or UTF-16 / UTF-32 with a byte-order
    mark (as Windows editors save one; the mark is not part of the first prompt); UsageError when it cannot be read
    or holds no prompt."""
    import codecs

    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"Cannot read prompt file {path} ({exc.strerror or exc}).") from None
    encoding = "utf-32" if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) else \
        "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UsageError(f"Prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 (or UTF-16 "
                         "with a byte-order mark) and try again.") from None
    prompts = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise UsageError(f"Prompt file {path} has no non-empty lines.")
    return prompts


def _jobs(args, settings) -> list:
    options = _parse_sets(args.sets)
    backend = args.backend or settings.backend
    device = args.device or settings.device
    prompts: list = [args.prompt] if args.prompt is not None else []
    if args.prompt_file:
        if args.prompt is not None:
            raise UsageError("Give --prompt or --prompt-file, not both.")
        prompts = [prompt for _, prompt in read_prompt_file(args.prompt_file)]
    images = args.image or [None]
    prompts = prompts or [None]
    messages = None
    if args.messages:
        from engine.chat import load_messages_file

        unread: list = []
        messages = [m.to_dict() for m in load_messages_file(args.messages, unread)]
        if unread:  # an OpenAI request body: its sampling fields are not the CLI's options
            print(f"studio: warning: {args.messages} also sets {', '.join(unread)}, which the command line does not "
                  "read; give options with --set (max_new_tokens=, temperature=, ...) and --model.", file=sys.stderr)
    jobs = []
    for p in prompts:
        for im in images:
            seed = nth_seed(args.seed, len(jobs))
            jobs.append(Job(args.generator, prompt=p, image=im, mask=getattr(args, "mask", None), model=args.model,
                            backend=backend, device=device, seed=seed, options=options, loras=list(args.lora),
                            messages=messages))
    return jobs


def cmd_generate(args) -> int:
    host = _host()
    settings = state.load_settings()
    store = ModelStore(host)
    if getattr(args, "caption_model", None) and not getattr(args, "prompt_from_caption", None):
        raise UsageError("--caption-model goes with --prompt-from-caption.")
    if getattr(args, "prompt_from_caption", None):
        args.prompt = _prompt_from_caption(args, host, store, settings)
    jobs = _jobs(args, settings)
    batch = len(jobs) > 1
    size = getattr(args, "batch_size", None)
    size = 1 if size is None else size
    if size < 1:
        raise UsageError("--batch-size must be 1 or more.")
    out, out_is_dir = out_target(args.out, batch, getattr(args, "overwrite", False))
    prepared = [prepare(host, store, job) for job in jobs]  # validate everything before any work
    if size > 1 and prepared[0].generator.batch is None:
        raise UsageError(f"Generator {prepared[0].generator.info.id} runs one input at a time; leave out "
                         "--batch-size.")
    history, unrecorded = History(), False
    if size > 1 and batch:  # several inputs at once: no streaming, each output saved as it would be alone
        from engine.runner import execute_batch

        for start in range(0, len(prepared), size):
            chunk = prepared[start:start + size]
            records = execute_batch(chunk, out_dir=out, history=history)
            for prep, record in zip(chunk, records):
                if isinstance(record, StudioError):  # that input failed; the others are kept
                    print(f"studio: error: {prep.job.prompt or prep.job.image}: {record}", file=sys.stderr)
                    unrecorded = True
                else:
                    unrecorded |= _report(args, prep, record, stream=False)
        return 1 if unrecorded else 0
    for prep in prepared:
        bar = _ProgressBar()
        stream = not args.json and not batch and prep.generator.info.makes == "text" and sys.stdout.isatty()

        def on_event(event, bar=bar, stream=stream):
            bar(event)
            if stream and getattr(event, "text", None):
                sys.stdout.write(event.text)
                sys.stdout.flush()

        out_path = out_dir = None
        if out is not None:
            out_dir, out_path = (out, None) if out_is_dir else (None, out)
            if out_path is not None and out_path.is_file():
                print(f"studio: warning: replacing {out_path} (--overwrite)", file=sys.stderr)
        try:
            record = execute(prep, on_event=on_event, out_path=out_path, out_dir=out_dir, history=history,
                             overwrite=getattr(args, "overwrite", False))
        except StudioError as exc:
            if getattr(exc, "result_text", None) and not stream:
                print(exc.result_text)  # generated, but not saved: the text is not lost
            raise
        bar.done()
        unrecorded |= _report(args, prep, record, stream)
    return 1 if unrecorded else 0


def _report(args, prep, record, stream: bool) -> bool:
    """Print one generation as `generate` does (JSON line, text, or path); True when it is not in the history."""
    r = record.recipe
    for warning in r.get("warnings", []):
        print(f"studio: warning: {warning}", file=sys.stderr)
    if args.json:
        keys = ("generator", "model", "backend", "device", "seed", "options", "timings", "text", "token_ids",
                "path", "width", "height", "prompt", "messages", "warnings", "history_id")
        obj = {k: r[k] for k in keys if k in r}
        obj["model"] = (r.get("model") or {}).get("name")
        if "messages" in prep.generator.info.takes:
            info = r.get("info", {})
            obj.update(role="assistant", stopped_by=info.get("stopped_by"), prompt_tokens=info.get("prompt_tokens"),
                       template=info.get("template"))
        _print_json(obj)
    elif prep.generator.info.makes == "text":
        if stream:
            print()
        else:
            print(r.get("text", ""))
        print(f"saved {r['path']}", file=sys.stderr)
    else:
        print(r["path"])
    return record.history_id is None


def cmd_chat(args) -> int:
    from studio.chat_cli import run_chat

    return run_chat(args)


# ----- caption-folder --------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cmd_caption_folder(args) -> int:
    from engine.caption_folder import caption_folder, plan_folder

    if args.batch_size < 1:
        raise UsageError("--batch-size must be 1 or more.")
    host = _host()
    settings = state.load_settings()
    store = ModelStore(host)
    options = _parse_sets(args.sets)
    if args.prefix:
        options["prefix"] = args.prefix
    plan = plan_folder(args.folder, args.ext, overwrite=args.overwrite, recursive=args.recursive)
    job = Job("caption", model=args.model, backend=args.backend or settings.backend,
              device=args.device or settings.device, options=options)
    from dataclasses import replace

    prepare(host, store, replace(job, image=str((plan.todo or plan.kept)[0])))  # model and options, before any work
    if plan.kept:
        print(f"studio: keeping {len(plan.kept)} existing caption file(s){'' if args.overwrite else ' (--overwrite replaces them)'}",
              file=sys.stderr)
    if not plan.todo:
        print(f"studio: every image in {plan.folder} already has a caption; nothing to do.", file=sys.stderr)
        return 0
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def on_item(item, done, total):
        if item.note:
            sys.stderr.write(("\r" + " " * 79 + "\r" if tty else "") + f"studio: skipped {item.image.name}: {item.note}\n")
        if args.json and not item.note:
            _print_json({"image": str(item.image), "caption": item.caption, "path": str(item.path),
                         "history_id": item.history_id})
        if tty:
            elapsed = time.monotonic() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            left = (total - done) / rate if rate > 0 else 0.0
            filled = int(30 * done / total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {rate:5.1f} img/s "
                             f"{_clock(left)} left ")
            sys.stderr.flush()

    history = History()
    report = caption_folder(host, store, job, plan, batch_size=args.batch_size, on_item=on_item, history=history)
    if tty:
        sys.stderr.write("\r" + " " * 79 + "\r")
    rate = len(report.written) / report.seconds if report.seconds > 0 else 0.0
    print(f"studio: wrote {len(report.written)} caption(s), skipped {len(report.skipped)}, kept {report.kept} "
          f"in {report.seconds:.1f}s ({rate:.1f} images/s)", file=sys.stderr)
    return 0


# ----- models ----------------------------------------------------------------------------------
def cmd_models(args) -> int:
    host = _host()
    store = ModelStore(host)
    if args.action == "list":
        entries = store.list()
        if args.json:
            _print_json([e.to_dict() for e in entries])
        else:
            _table([(e.name, e.family, e.generator, "built-in" if e.builtin else "user", e.size_text,
                     e.hash[:12], e.studio.get("autov2") or "-", ",".join(e.onnx) or "-") for e in entries],
                   ["NAME", "FAMILY", "GENERATOR", "SOURCE", "SIZE", "HASH", "AUTOV2", "ONNX"])
    elif args.action == "info":
        entry = store.get(args.name)
        data = entry.to_dict()
        data["studio"] = entry.studio
        if args.json:
            _print_json(data)
        else:
            for key in ("name", "title", "family", "generator", "builtin", "path", "hash", "size_bytes", "onnx"):
                print(f"{key}: {data[key]}")
            if data["autov2"]:
                print(f"autov2: {data['autov2']} (A1111's model hash of {entry.studio.get('source_file', 'the file')})")
            for key, value in entry.studio.get("scores", {}).items():
                print(f"score {key}: {value}")
            if entry.changed:
                print(f"changed: {entry.changed}")
    elif args.action == "import":
        entry = store.import_(Path(args.path), name=args.name, trust=args.trust)
        print(f"imported {entry.name} ({entry.family}, hash {entry.hash[:12]}) into {entry.path}")
    elif args.action == "remove":
        store.remove(args.name)
        print(f"removed {args.name}")
    elif args.action == "merge-lora":
        from engine.merge import merge_lora

        entry = merge_lora(store, args.model, args.lora, args.name)
        print(f"merged into {entry.name} ({entry.family}, hash {entry.hash[:12]}) at {entry.path}")
    return 0


def cmd_export_onnx(args) -> int:
    from engine.onnx_export import export_model, parity_line

    host = _host()
    store = ModelStore(host)
    entry = store.get(args.model)
    if not args.out and not entry.builtin and entry.path.resolve().parent != store.user_dir.resolve():
        raise UsageError(f"{entry.path} is not in the model store, and the studio writes into your own folders only "
                         f"when told: import it first (`studio models import {args.model}`), or give --out (for "
                         f"example --out {entry.path / 'onnx'}, where --model {args.model} finds it).")
    manifest = export_model(host, entry, out_dir=Path(args.out) if args.out else None,
                            quantize=args.quantize, force=args.force,
                            log=lambda msg: print(msg, file=sys.stderr))
    if args.json:
        _print_json(manifest)
    else:
        print(f"exported {entry.name} to {manifest['folder']}")
        for name, figures in manifest.get("parity", {}).items():
            print("parity " + parity_line(name, figures))
        if not manifest.get("used_by_backend", True):
            print(f"note: --backend onnx loads graphs only from the model's own export folders, so it will not use "
                  f"this one; run `studio export-onnx {entry.name}` without --out for that.", file=sys.stderr)
    return 0


# ----- plugins ---------------------------------------------------------------------------------
def cmd_plugins(args) -> int:
    from engine import install

    if args.action == "list":
        host = _host()
        plugins = list(host.plugins.values())
        if args.json:
            _print_json([p.to_dict() for p in plugins])
        else:
            _table([(p.name, p.version or "-", p.source, p.status, p.error or ",".join(p.generators))
                    for p in plugins], ["NAME", "VERSION", "SOURCE", "STATUS", "GENERATORS / ERROR"])
        return 0
    if args.action == "install":
        print(f"studio: warning: {install.WARNING}", file=sys.stderr)
        install.install(args.source)
        print(f"installed {args.source}; run `studio plugins list` to see it")
    elif args.action == "uninstall":
        install.uninstall(PluginHost().load(), args.name)
        print(f"uninstalled {args.name}")
    else:
        host = PluginHost(safe_mode=False).load()
        if args.name not in host.plugins:
            raise UsageError(f"There is no plugin called {args.name!r}; see `studio plugins list`.")
        set_enabled(args.name, args.action == "enable")
        print(f"{args.action}d {args.name} (takes effect the next time the studio starts)")
    return 0


# ----- history ---------------------------------------------------------------------------------
def cmd_history(args) -> int:
    from studio.history_cli import history_command

    return history_command(args)


# ----- training --------------------------------------------------------------------------------
def option_lines(generator: str, model: Optional[str] = None) -> str:
    """The options of a generator as `generate GENERATOR --help` lists them: name, type, default, range, help; a
    default that the model's generation_config.json gives is marked. The model: ``model``, else the default one."""
    from engine.runner import model_option_defaults

    host = _host()
    if generator not in host.generators:
        return f"(no generator {generator!r} is installed; `studio generators` lists them)"
    info = host.generator(generator).info
    entry = None
    if info.families:
        store = ModelStore(host)
        try:
            entry = store.get(model) if model else store.default_for(info.id, info.families)
        except StudioError:
            entry = None
    ours = model_option_defaults(info, entry)
    head = f"options of {info.id} (--set NAME=VALUE)"
    if entry is not None:
        head += f", defaults for model {entry.name}" + (" (* from its generation_config.json)" if ours else "")
    rows = [head + ":"]
    for o in info.options:
        default = ours.get(o.name, o.default)
        span = f" [{o.min:g}..{o.max:g}]" if o.min is not None and o.max is not None else ""
        choices = f" {{{', '.join(map(str, o.choices))}}}" if o.choices else ""
        mark = "*" if o.name in ours else ""
        rows.append(f"  {o.name:<20} {o.type:<5} default {default!r}{mark}{span}{choices}  {o.help}")
    return "\n".join(rows)


def trainer_lines(finetune: bool = False) -> str:
    host = _host()
    found = host.finetuners if finetune else host.trainers
    rows = [f"  {kind:<10} {t.title} (plugin {plugin})" for kind, (t, plugin) in sorted(found.items())]
    return "\n".join(rows) or "  (none: no loaded plugin registers one)"


def cmd_train(args) -> int:
    if not args.kind:
        raise UsageError("Say what to train: studio train KIND [OPTIONS] (`studio train --help` lists the kinds).")
    trainer = _host().trainer(args.kind)
    return int(trainer.run(list(args.args)) or 0)


def cmd_finetune(args) -> int:
    if not args.kind:
        raise UsageError("Say what to fine-tune: studio finetune KIND --model NAME --data PATH "
                         "(`studio finetune --help` lists the kinds).")
    return int(_host().trainer(args.kind, finetune=True).run(list(args.args)) or 0)


# ----- queue, batch, serve ---------------------------------------------------------------------
def cmd_queue(args) -> int:
    from studio.queue_cli import cmd_queue as run

    return run(args)


def cmd_batch(args) -> int:
    from studio.queue_cli import cmd_batch as run

    return run(args)


def cmd_serve(args) -> int:
    from studio.server import serve

    return serve(args)
