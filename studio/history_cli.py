"""`studio history ...`: list, show and replay the history from the command line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine import state
from engine.errors import UsageError
from engine.history import History
from engine.replay import replay
from engine.store import ModelStore
from studio.commands import _host, _print_json, _table
from studio.out_target import out_target


WIDTH = 50  # characters of a prompt `history list` shows


def what(entry) -> str:
    """A row's input as `history list` shows it: the input image's file name (a caption's only input), then the
    prompt on one line, cut to WIDTH characters with an ellipsis."""
    image = entry.recipe.get("image") if isinstance(entry.recipe, dict) else None
    if isinstance(image, dict):
        image = image.get("path") or image.get("kept")
    name = Path(image).name if isinstance(image, str) and image else ""
    prompt = " ".join((entry.prompt or "").split())
    if len(prompt) > WIDTH:
        prompt = prompt[:WIDTH - 1].rstrip() + "…"
    return f"{name}: {prompt}" if name and prompt else name or prompt


def history_command(args) -> int:
    """`studio history list|show|replay`; replaying a fine-tune's row trains it again and compares the adapters."""
    history = History()
    if args.action == "list":
        from engine.runner import check_text

        check_text(args.search, "The search")
        entries = history.list(limit=args.limit, search=args.search, generator=args.generator)
        if args.json:
            _print_json([e.to_dict() for e in entries])
        else:
            _table([(e.id, time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)), e.generator, e.model,
                     e.seed, what(e)) for e in entries],
                   ["ID", "WHEN", "GENERATOR", "MODEL", "SEED", "PROMPT / IMAGE"])
    elif args.action == "show":
        entry = history.get(args.id)
        if args.json:
            _print_json(entry.to_dict())
        else:
            print(json.dumps(entry.recipe, indent=2, sort_keys=True))
            for o in entry.outputs:
                since = f" (replaced since by generation {o['replaced_by']})" if o.get("replaced_by") else ""
                print(f"output {o['path']} sha256 {o['sha256'][:16]}{since}")
    elif args.action == "replay":
        entry = history.get(args.id)
        if entry.generator == "finetune":  # a fine-tune: train it again and compare the adapters
            from engine import finetune

            if args.backend:
                raise UsageError("A fine-tune replays with PyTorch; leave out --backend.")

            out = Path(args.out).expanduser() if args.out else \
                state.home() / "finetunes" / f"replay-{args.id}-{time.strftime('%Y%m%d-%H%M%S')}"
            weights, same = finetune.replay(entry.recipe, entry.outputs, out)
            print(weights)
            print("identical to the original adapter" if same else "DIFFERENT from the original adapter")
            return 0 if same else 1
        host = _host()
        out, out_is_dir = out_target(args.out, False, args.overwrite)
        record, same, notes = replay(host, ModelStore(host), entry.recipe, device=args.device, backend=args.backend,
                                     out_path=None if out_is_dir else out, out_dir=out if out_is_dir else None,
                                     history=history, overwrite=args.overwrite)
        for note in notes:
            print(f"studio: warning: {note}", file=sys.stderr)
        print(record.recipe["path"])
        print("identical to the original output" if same else "DIFFERENT from the original output")
        return 0 if same else 1
    return 0
