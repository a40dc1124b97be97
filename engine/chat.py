"""Conversations: messages, a model's chat template (rendered as transformers renders it), and the context budget.

Light on purpose (jinja2 and ``tokenizers`` only, no torch): the window uses it for the context meter, the text
family for the ``chat`` generator. A model's template comes from its folder, where transformers keeps it: a
``chat_template.jinja`` file (first, as in transformers), or ``tokenizer_config.json``'s ``chat_template`` (a
string, or a list of ``{"name", "template"}``: the ``default`` one). A template is checked before it runs (no
imports or includes, no attribute names that start with ``_``) and then runs in jinja2's immutable sandbox with the globals and filters
transformers gives it (``raise_exception``, ``strftime_now``, ``tojson``, the special tokens). A model without a
template gets ``FALLBACK_TEMPLATE``, and everything that shows the conversation says so.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

from engine.errors import ModelError, UsageError

ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
MAX_MESSAGES = 1000
MAX_MESSAGE_CHARS = 100_000

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_NOTE = ("The model has no chat template; the studio wrote the conversation as plain 'User:' / "
                 "'Assistant:' lines, which the model may not have been trained on.")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


def parse_messages(raw, need_user_last: bool = True) -> tuple:
    """A list of ``{"role", "content"}`` dicts (or Messages) -> a tuple of Messages; UsageError on anything else.

    ``need_user_last``: the conversation must end with a user turn (the next turn is the assistant's)."""
    if not isinstance(raw, (list, tuple)):
        raise UsageError("The conversation must be a list of messages, each {\"role\": ..., \"content\": ...}.")
    if not raw:
        raise UsageError("The conversation is empty; give at least one user message.")
    if len(raw) > MAX_MESSAGES:
        raise UsageError(f"The conversation has {len(raw)} messages; the limit is {MAX_MESSAGES}.")
    out = []
    for i, m in enumerate(raw, 1):
        if isinstance(m, Message):
            m = m.to_dict()
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError(f"Message {i} must be an object with a text \"role\" and a text \"content\".")
        role = ALIASES.get(m["role"], m["role"])
        if role not in ROLES:
            raise UsageError(f"Message {i} has the role {m['role']!r}; a role is one of {', '.join(ROLES)}.")
        content = _text_content(m.get("content"), i)
        if len(content) > MAX_MESSAGE_CHARS:
            raise UsageError(f"Message {i} is {len(content)} characters long; the limit is {MAX_MESSAGE_CHARS}.")
        out.append(Message(role, content))
    if need_user_last and out[-1].role != "user":
        article = "an" if out[-1].role[0] in "aeiou" else "a"
        raise UsageError(f"The conversation ends with {article} {out[-1].role} message; the next answer needs a user message "
                         "last (to regenerate an answer, leave the old answer out).")
    return tuple(out)


def _text_content(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of content parts, whose text parts are joined by new lines
    (as vLLM and llama.cpp's server do for a text-only model)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        texts = []
        for n, part in enumerate(content, 1):
            if part.get("type") != "text":
                kind = part.get("type") if isinstance(part.get("type"), str) else "untyped"
                raise UsageError(f"Message {i} holds a part of type {kind!r}; this chat reads text only "
                                 "(a part is {\"type\": \"text\", \"text\": ...}).")
            if not isinstance(part.get("text"), str):
                raise UsageError(f"Part {n} of message {i} has no \"text\" string (a part is "
                                 "{\"type\": \"text\", \"text\": ...}).")
            texts.append(part["text"])
        return "\n".join(texts)
    raise UsageError(f"Message {i} must be an object with a text \"role\" and a text \"content\".")


def load_messages_file(path, unread: Optional[list] = None) -> tuple:
    """A JSON file: a list of messages, or an object with a ``messages`` list (as OpenAI requests have); the
    object's other fields (``max_tokens``, ``temperature``...) are added to ``unread``, for the caller to say."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UsageError(f"Messages file {path} does not exist.") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"Messages file {path} is not valid JSON ({exc}).") from None
    if isinstance(data, dict):
        if unread is not None:
            unread += [k for k in data if k != "messages"]
        data = data.get("messages")
    return parse_messages(data)


# ----- templates ---------------------------------------------------------------------------------------------------

class TemplateRefused(ModelError):
    """A chat template that tries to reach outside the sandbox; it is never run."""


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text); renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):  # noqa: A002 - the name templates use
        return datetime.now().strftime(format)

    class Sandbox(ImmutableSandboxedEnvironment):
        """jinja2's sandbox, with ``*``, ``+`` and ``**`` checked before they run: ``'x' * 10**9`` or a string doubled
        in a loop filled the memory (19 GB, then killed) within the range budget."""
        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 1000:
                raise jinja2.sandbox.SecurityError("a power past 1000")
            seqs = [x for x in (left, right) if isinstance(x, (str, list, tuple))]
            size = 0
            if operator == "+" and len(seqs) == 2:
                size = len(left) + len(right)
            elif operator == "*" and len(seqs) == 1:
                count = right if seqs[0] is left else left
                size = len(seqs[0]) * count if isinstance(count, int) else 0
            if size > OUTPUT_LIMIT:
                raise jinja2.sandbox.SecurityError(f"a text or list past {OUTPUT_LIMIT:,} items")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.range_left = threading.local()  # .value: reset by each render, per thread (the window's meter renders in
    # a thread of its own while the window renders too)

    def budgeted_range(*args):
        """jinja2's sandbox caps one range() at 100,000 items, but nested loops multiply them (hours of work):
        all the range() calls of one render share one budget."""
        items = range(*args)
        env.range_left.value = getattr(env.range_left, "value", RANGE_BUDGET) - len(items)
        if env.range_left.value < 0:
            raise jinja2.sandbox.SecurityError(f"its loops run past {RANGE_BUDGET:,} steps")
        return items

    env.globals["range"] = budgeted_range
    return env


RANGE_BUDGET = 1_000_000  # range() items in one render of a chat template (real templates use a few hundred)
OUTPUT_LIMIT = 10_000_000  # characters a render may write (a 128k-token context is about 500,000)


def _check_source(env, source: str, name: str):
    """Parse ``source``; refuse (without running it) imports, includes, extends and ``_private`` attributes."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(f"The chat template of {name} does not parse: {exc.message} (line {exc.lineno}).") from None
    for node in tree.find_all((nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
        raise TemplateRefused(f"The chat template of {name} tries to load another template "
                              f"({type(node).__name__.lower()}); the studio refuses it and did not run it.")
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        attr = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else "")
        if attr.startswith("_"):
            raise TemplateRefused(f"The chat template of {name} reaches for the internal attribute {attr!r}; "
                                  "the studio refuses it and did not run it.")
    for node in tree.find_all(nodes.Name):
        if node.name.startswith("__"):
            raise TemplateRefused(f"The chat template of {name} uses the internal name {node.name!r}; "
                                  "the studio refuses it and did not run it.")
    return tree


@dataclass
class ChatTemplate:
    """A model's chat template, compiled. ``special`` holds the special tokens the template sees
    (``bos_token``, ``eos_token``, ...); ``fallback`` is True when the model has none of its own."""

    source: str
    special: dict = field(default_factory=dict)
    name: str = "the model"
    fallback: bool = False

    def __post_init__(self):
        import jinja2

        env = _environment()
        _check_source(env, self.source, self.name)
        try:
            self._compiled = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"The chat template of {self.name} does not compile: {exc}.") from None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def render(self, messages: Iterable, add_generation_prompt: bool = True) -> str:
        """The prompt text, exactly as transformers' ``apply_chat_template(..., tokenize=False)`` writes it."""
        import jinja2
        from jinja2.sandbox import SecurityError

        msgs = [m.to_dict() if isinstance(m, Message) else dict(m) for m in messages]
        self._compiled.environment.range_left.value = RANGE_BUDGET
        try:
            out, size = [], 0
            for piece in self._compiled.generate(messages=msgs, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special):
                size += len(piece)
                if size > OUTPUT_LIMIT:
                    raise SecurityError(f"it wrote past {OUTPUT_LIMIT:,} characters")
                out.append(piece)
            return "".join(out)
        except SecurityError as exc:
            raise TemplateRefused(f"The chat template of {self.name} tried something the sandbox forbids "
                                  f"({exc}); it was stopped.") from None
        except jinja2.TemplateError as exc:
            raise ModelError(f"The chat template of {self.name} failed: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - a template's own arithmetic or type error
            raise ModelError(f"The chat template of {self.name} failed: {type(exc).__name__}: "
                             f"{_one_line(exc)}") from None

    def end_of_turn(self) -> str:
        """What the template writes after an assistant's message: its end-of-turn marker (``<|eot_id|>``,
        ``<|im_end|>``, ``<end_of_turn>``, a blank line...), found by rendering a probe; "" when none shows."""
        probe = "\x00studio-probe\x00"
        try:
            text = self.render([Message("user", "hi"), Message("assistant", probe)], add_generation_prompt=False)
        except ModelError:
            return ""
        if probe not in text:
            return ""
        tail = text.split(probe, 1)[1]
        return tail.rstrip() or tail


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text


def _token_text(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # {"content": ..., "lstrip": ...}
        return value["content"]
    return None


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def find_template(folder) -> tuple:
    """(template source or None, tokenizer_config dict) for a model folder."""
    from engine.configs import read_json

    folder = Path(folder)
    path = folder / "tokenizer_config.json"
    cfg = read_json(path, "a tokenizer_config.json") if path.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():  # as in transformers, the file wins over the config's entry
        try:
            source = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ModelError(f"{jinja_file} cannot be read as text; the model folder is damaged.") from None
    return (source if isinstance(source, str) and source.strip() else None), cfg


def load_template(folder, name: Optional[str] = None) -> ChatTemplate:
    """The chat template of a model folder, or the plain fallback (``fallback=True``)."""
    source, cfg = find_template(folder)
    special = {k: _token_text(cfg.get(k)) for k in SPECIAL_KEYS if _token_text(cfg.get(k)) is not None}
    label = name or Path(folder).name
    if source is None:
        return ChatTemplate(FALLBACK_TEMPLATE, special, label, fallback=True)
    return ChatTemplate(source, special, label)


def encode(tokenizer, text: str) -> list:
    """Token ids of a rendered prompt, as transformers tokenizes it (the template writes the special tokens).
    ``tokenizers`` holds Python's lock through ``encode`` but not through ``encode_batch``: a long conversation is
    counted through the latter, so that a counting thread leaves the window's thread free."""
    if len(text) > 10_000 and hasattr(tokenizer, "encode_batch"):
        return list(tokenizer.encode_batch([text], add_special_tokens=False)[0].ids)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


class TokenMemo:
    """Token counts of rendered conversations, by the text's digest, for one tokenizer: the meter, Send and
    leaving out turns count the same conversation once (a long one takes a good part of a second). Thread-safe."""

    SIZE = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.counts: dict = {}
        self.lock = threading.Lock()

    def key(self, text: str) -> bytes:
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()

    def known(self, text: str, key: Optional[bytes] = None) -> Optional[int]:
        with self.lock:
            return self.counts.get(key or self.key(text))

    def count(self, text: str) -> int:
        key = self.key(text)  # (hashed once: a long conversation is a megabyte)
        n = self.known(text, key)
        if n is None:
            n = len(encode(self.tokenizer, text))
            with self.lock:
                if len(self.counts) >= self.SIZE:
                    self.counts.pop(next(iter(self.counts)))
                self.counts[key] = n
        return n


def _count(tokenizer, text: str) -> int:
    """``tokenizer`` may be a TokenMemo (counts remembered) or a tokenizer."""
    return tokenizer.count(text) if isinstance(tokenizer, TokenMemo) else len(encode(tokenizer, text))


def stop_markers(template: ChatTemplate, tokenizer) -> tuple:
    """(token ids, strings) that end the assistant's turn: the template's end-of-turn marker, as a token id when
    the tokenizer has it as one added token (``<|eot_id|>``, ``<|im_end|>``...), else as a stop string."""
    if template.fallback:
        return (), ("\nUser:",)
    marker = template.end_of_turn()
    if not marker:
        return (), ()
    first = marker.split()[0] if marker.strip() else marker
    added = {t.content for t in _added_tokens(tokenizer)}
    ids = encode(tokenizer, first)
    if first in added and len(ids) == 1:
        return (ids[0],), ()
    return (), (marker,)


def _added_tokens(tokenizer) -> list:
    try:
        return list(tokenizer.get_added_tokens_decoder().values())
    except AttributeError:
        return []


# ----- the context budget ------------------------------------------------------------------------------------------

def context_length(config: dict) -> int:
    """A model's context (positions) from its config.json (Llama/Qwen/... and GPT-2 spellings)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_positions"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def reserve(context: int, max_new_tokens: int) -> int:
    """Room kept free for the answer: ``max_new_tokens``, but never more than a quarter of the context."""
    return max(1, min(int(max_new_tokens), context // 4))


def budget(context: int, max_new_tokens: int) -> int:
    """The most prompt tokens a conversation may use so that the answer still has its room."""
    return context - reserve(context, max_new_tokens)


@dataclass(frozen=True)
class Fit:
    tokens: int  # prompt tokens of the conversation as the template renders it
    context: int
    budget: int

    @property
    def fits(self) -> bool:
        return self.tokens <= self.budget

    def describe(self) -> str:
        return (f"The conversation is {self.tokens} tokens; the model's context of {self.context} tokens leaves "
                f"{self.budget} for it with room for the answer.")


def measure(template: ChatTemplate, tokenizer, messages, context: int, max_new_tokens: int) -> Fit:
    """How the conversation fits; ``tokenizer`` may be a TokenMemo."""
    return Fit(_count(tokenizer, template.render(messages, add_generation_prompt=True)), context,
               budget(context, max_new_tokens))


def _drop_steps(messages) -> list:
    """(kept, dropped) after each step of leaving out the oldest turn (not a system message, not the last message;
    a user turn goes with the answer after it), the whole conversation first."""
    msgs, dropped = list(messages), []
    steps = [(tuple(msgs), ())]
    while True:
        idx = [i for i, m in enumerate(msgs[:-1]) if m.role != "system"]
        if not idx:
            return steps
        first = idx[0]
        dropped.append(msgs.pop(first))
        if dropped[-1].role == "user" and first < len(msgs) - 1 and msgs[first].role == "assistant":
            dropped.append(msgs.pop(first))
        steps.append((tuple(msgs), tuple(dropped)))


def drop_oldest(template: ChatTemplate, tokenizer, messages, context: int, max_new_tokens: int) -> tuple:
    """(kept messages, dropped messages): the oldest turns (not system messages, not the last user message) left
    out, a user turn with its answer at a time, until the conversation fits. Raises UsageError when even the
    system messages and the last user message alone do not fit. The fewest steps that fit are found by halving
    (a conversation only shrinks as turns go), so a long conversation is counted a few times, not once a turn."""
    steps = _drop_steps(messages)
    if measure(template, tokenizer, steps[0][0], context, max_new_tokens).fits:
        return steps[0]
    lo, hi = 1, len(steps) - 1
    last = measure(template, tokenizer, steps[hi][0], context, max_new_tokens)
    if not last.fits:
        raise UsageError(last.describe() + " Even the last message alone is too long; shorten it.")
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(template, tokenizer, steps[mid][0], context, max_new_tokens).fits:
            hi = mid
        else:
            lo = mid + 1
    return steps[lo]
