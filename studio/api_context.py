"""The OpenAI endpoints' prompt check: a prompt (or a conversation, as the model's chat template writes it) that
does not fit the model's context is refused with HTTP 400, code ``context_length_exceeded``, as OpenAI and vLLM
refuse it, before anything is queued (the text generator would cut it, with only a warning in the recipe).

Counted as the generators count (plugins/text: the prompt's tokens with the BOS token the family adds; for chat the
template's text, engine.chat.encode) with the model's own tokenizer and template (engine.tokenizer, engine.chat: no
torch), each loaded once per model and kept; the limit is the generators' own (engine.chat.budget: the context less
the room kept for the answer).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Optional

from engine import chat
from engine.errors import ModelError, UsageError

log = logging.getLogger(__name__)

KEPT_MODELS = 4  # tokenizers (and templates) kept loaded; the least recently used goes first


class ContextExceeded(UsageError):
    """A prompt longer than the model's context allows (HTTP 400, OpenAI's code ``context_length_exceeded``)."""

    code = "context_length_exceeded"


class _Model:
    """One model's tokenizer, context, BOS rule and (loaded at first use) chat template."""

    def __init__(self, model):
        from engine.tokenizer import load_tokenizer

        self.model = model
        self.tokenizer = load_tokenizer(model.path)
        self.context = chat.context_length(model.config or {})
        bos = (model.config or {}).get("bos_token_id")
        self.bos = bos if isinstance(bos, int) and not isinstance(bos, bool) else None
        self.add_bos = _adds_bos(model.family)
        self._template = None
        self._lock = threading.Lock()  # a template's render keeps a budget of its own: one render at a time

    def prompt_tokens(self, prompt: str) -> int:
        """As the text generator counts them (plugins.text.families.prompt_ids)."""
        from plugins.text.families import prompt_ids

        return len(prompt_ids(self.tokenizer, prompt, self.bos, self.add_bos))

    def conversation_tokens(self, messages) -> int:
        """As the chat generator counts them: the conversation as the model's chat template writes it."""
        with self._lock:
            if self._template is None:
                self._template = chat.load_template(self.model.path, self.model.name)
            text = self._template.render(messages, add_generation_prompt=True)
        return len(chat.encode(self.tokenizer, text))


def _adds_bos(family: str) -> bool:
    try:
        from plugins.text.families import BY_NAME
    except ImportError:  # (the built-in text plugin is always there; a family it does not know starts with BOS)
        return True
    found = BY_NAME.get(family)
    return found.add_bos if found is not None else True


class ContextCheck:
    """The check, with each model's tokenizer kept between requests (thread-safe: requests call it from the thread
    pool, so a large tokenizer loading or a long prompt being counted never holds up the event loop)."""

    def __init__(self, kept: int = KEPT_MODELS):
        self.kept = kept
        self._lock = threading.Lock()
        self._models: OrderedDict = OrderedDict()

    def _model(self, model) -> Optional[_Model]:
        key = (model.hash, str(model.path))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        try:
            loaded = _Model(model)
        except ModelError as exc:  # the generation reports it in its own words
            log.debug("no prompt check for %s: %s", model.name, exc)
            return None
        with self._lock:
            self._models[key] = loaded
            while len(self._models) > self.kept:
                self._models.popitem(last=False)
        return loaded

    def check(self, request, which: str = "") -> None:
        """ContextExceeded when the request's prompt (or conversation) does not fit the model's context with room
        for the answer. ``which``: how to name the prompt of a list ("Prompt 2 of 3"); "" for "The prompt"."""
        if request.model is None:
            return
        meter = self._model(request.model)
        if meter is None:
            return
        limit = chat.budget(meter.context, int(request.options.get("max_new_tokens") or 1))
        if request.messages:
            tokens, what, todo = meter.conversation_tokens(request.messages), "The conversation", \
                "shorten or leave out messages"
        else:
            tokens, what, todo = meter.prompt_tokens(request.prompt or ""), which or "The prompt", "shorten the prompt"
        if tokens > limit:
            raise ContextExceeded(
                f"{what} is {tokens} tokens, but model {request.model.name}'s maximum context length of "
                f"{meter.context} tokens holds at most {limit} with {meter.context - limit} kept for the answer; "
                f"{todo} (nothing was cut).")
