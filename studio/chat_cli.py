"""`studio chat`: an interactive conversation on the terminal, streamed, through the same runner as `generate chat`.

Commands: /reset (start again, keeping the system prompt), /save FILE (the conversation as JSON, readable by
`studio generate chat --messages FILE`), /quit. Ctrl+C while the model answers stops the answer (what it wrote is
kept as its turn); Ctrl+C or Ctrl+D at the prompt ends the chat. A conversation that would not fit the model's
context is shown and the user chooses to drop the oldest turns or not; nothing is cut silently.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from engine import chat, state
from engine.errors import CancelledError, StudioError, UsageError
from engine.generators import CancelToken, Context, Partial
from engine.history import History
from engine.plugins import PluginHost
from engine.runner import Job, execute, nth_seed, prepare
from engine.store import ModelStore
from engine.tokenizer import load_tokenizer

HELP = "Commands: /reset starts again, /save FILE writes the conversation as JSON, /quit ends. Ctrl+C stops an answer."


class Conversation:
    """The turns so far and what the model's template and context make of them."""

    def __init__(self, entry, system: str | None, max_new_tokens: int):
        self.system = system
        self.template = chat.load_template(entry.path, entry.name)
        self.tokenizer = load_tokenizer(entry.path)
        self.context = chat.context_length(entry.config)
        self.max_new_tokens = max_new_tokens
        self.messages: list = []
        self.saved: set = set()  # files this chat wrote: /save replaces them without asking
        self.reset()

    def reset(self) -> None:
        self.messages = [chat.Message("system", self.system)] if self.system else []

    def fit(self) -> chat.Fit:
        return chat.measure(self.template, self.tokenizer, self.messages, self.context, self.max_new_tokens)

    def save(self, p: Path) -> Path:
        """The conversation as a messages file at ``p`` (resolved), written whole (a failed write leaves the old
        file as it was)."""
        from engine.outputs import atomic_write_bytes

        text = json.dumps([m.to_dict() for m in self.messages], indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(p, text.encode("utf-8"))
        self.saved.add(p)
        return p


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        print()
        return False


def _make_room(conv: Conversation) -> bool:
    """Warn when the conversation would not fit; drop the oldest turns only if the user says so."""
    fit = conv.fit()
    if fit.fits:
        return True
    print(f"studio: warning: {fit.describe()}", file=sys.stderr)
    try:
        kept, dropped = chat.drop_oldest(conv.template, conv.tokenizer, conv.messages, conv.context,
                                         conv.max_new_tokens)
    except UsageError as exc:
        print(f"studio: {exc}", file=sys.stderr)
        return False
    print("To fit, these oldest turns would be left out:", file=sys.stderr)
    for m in dropped:
        print(f"  {m.role}: {m.content[:70]}{'...' if len(m.content) > 70 else ''}", file=sys.stderr)
    if not _ask(f"Drop these {len(dropped)} messages and answer? [y/N] "):
        return False
    conv.messages = list(kept)
    return True


def run_chat(args) -> int:
    from studio.commands import _parse_sets

    host = PluginHost().load()
    store = ModelStore(host)
    settings = state.load_settings()
    options = _parse_sets(args.sets)  # what the user sets; the model's generation_config.json gives the rest
    job = Job("chat", model=args.model, backend=args.backend or settings.backend, device=args.device or settings.device,
              options=options, loras=list(args.lora), messages=[{"role": "user", "content": "?"}])
    request = prepare(host, store, job).request  # validates model, options and LoRAs first
    entry_name = request.model.name
    conv = Conversation(store.get(args.model or entry_name), args.system, request.options["max_new_tokens"])
    if args.system:  # a template that refuses a system prompt (Gemma's) would fail every turn
        try:
            conv.template.render([chat.Message("system", args.system), chat.Message("user", "?")])
        except StudioError as exc:
            raise UsageError(f"{str(exc).rstrip('.')}; leave out --system for this model.") from None
    if conv.template.fallback:
        print(f"studio: note: {chat.FALLBACK_NOTE}", file=sys.stderr)
    print(f"Chatting with {entry_name} (context {conv.context} tokens). {HELP}", file=sys.stderr)
    cache: dict = {}
    history = History()
    turn = 0
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/help":
            print(HELP)
            continue
        if text == "/reset":
            conv.reset()
            print("(a new conversation)", file=sys.stderr)
            continue
        if text.startswith("/save"):
            name = text[5:].strip()
            if not name:
                print("studio: /save needs a file name: /save chat.json", file=sys.stderr)
                continue
            target = Path(name).expanduser().resolve()
            if target.exists() and target not in conv.saved and not _ask(f"{name} exists; replace it? [y/N] "):
                print("studio: not saved; /save another file name", file=sys.stderr)
                continue
            try:
                print(f"saved {conv.save(target)}", file=sys.stderr)
            except (OSError, StudioError) as exc:
                print(f"studio: cannot write {name}: {exc}", file=sys.stderr)
            continue
        conv.messages.append(chat.Message("user", line))
        try:
            room = _make_room(conv)
        except StudioError as exc:  # e.g. the template refuses this conversation: say so, keep chatting
            print(f"studio: error: {exc}", file=sys.stderr)
            room = False
        if not room:
            conv.messages.pop()
            continue
        seed = nth_seed(args.seed, turn)
        turn += 1
        answer = _answer(host, store, job, conv, seed, cache, history)
        if answer is not None:
            conv.messages.append(chat.Message("assistant", answer))
        else:
            conv.messages.pop()


def _answer(host, store, job, conv, seed, cache, history):
    """Stream the next answer; its text (what was written before a Ctrl+C too), or None when it failed."""
    token = CancelToken()
    written: list = []

    def on_event(event):
        if isinstance(event, Partial) and event.text:
            written.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()

    previous = signal.signal(signal.SIGINT, lambda *_: token.cancel())
    try:
        job.messages = [m.to_dict() for m in conv.messages]
        job.seed = seed
        record = execute(prepare(host, store, job), Context(cancel=token, cache=cache), on_event=on_event,
                         history=history)
        print()
        for warning in record.recipe.get("warnings", []):
            if warning != chat.FALLBACK_NOTE:
                print(f"studio: warning: {warning}", file=sys.stderr)
        return record.recipe.get("text", "")
    except CancelledError:
        print("\n(stopped)", file=sys.stderr)
        return "".join(written) if written else None
    except StudioError as exc:
        print(f"\nstudio: error: {exc}", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGINT, previous)
