"""The ``chat`` generator: the next assistant message of a conversation (``request.messages``).

The conversation is rendered with the model's own chat template (engine.chat), tokenized as transformers does,
and decoded by the text pipeline until the template's end-of-turn marker. The decoder's cache of the last
conversation stays in the generation context, so a new turn reads only the tokens it adds. A conversation that
does not fit the context is refused with a clear message, never cut.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import chat
from engine.errors import UsageError
from engine.generators import Progress, Result, timed


def _template(request, context):
    from plugins.text.models import load_tokenizer

    model = request.model

    def load():
        folder = Path(model.path)
        return chat.load_template(folder, model.name), load_tokenizer(folder)
    return context.cached(("chat-template", model.hash, str(model.path)), load)


def generate(request, context):
    from plugins.text import _pipeline
    from plugins.text.pipeline import PrefixState, TextRequest, parse_stop
    from plugins.text.sampling import SamplingOptions

    if request.model is None:
        raise UsageError("The chat generator needs a model; pass one with --model.")
    messages = chat.parse_messages(list(getattr(request, "messages", ()) or ()))
    opts = request.options
    yield Progress(0, 1, f"loading {request.model.name if request.model else 'the model'} ({request.backend})")
    t0 = time.perf_counter()
    template, tokenizer = _template(request, context)
    prompt = template.render(messages, add_generation_prompt=True)
    ids = chat.encode(tokenizer, prompt)
    pipe = _pipeline(request, context)
    load_s = time.perf_counter() - t0
    ctx = pipe.decoder.max_positions
    fit = chat.Fit(len(ids), ctx, chat.budget(ctx, opts["max_new_tokens"]))
    if not ids:
        raise UsageError("The chat template wrote an empty prompt for this conversation.")
    if not fit.fits:
        raise UsageError(fit.describe() + " Drop the oldest turns or shorten the messages; nothing was cut.")
    stop_ids, stop_strings = chat.stop_markers(template, tokenizer)
    req = TextRequest(max_new_tokens=opts["max_new_tokens"], sampling=SamplingOptions.from_options(opts),
                      stop=parse_stop(opts.get("stop", "")) + tuple(stop_strings), seed=request.seed,
                      stop_ids=tuple(stop_ids), slide=False)
    prefix = context.loaded("chat-prefix", request, PrefixState) if _reuse_prefix() else None
    warnings = [chat.FALLBACK_NOTE] if template.fallback else []
    context.cancel.raise_if_cancelled()
    yield Progress(0, req.max_new_tokens, "writing")
    for event in timed(pipe.run_ids(ids, req, context.cancel, prefix=prefix, warnings=warnings), load_s):
        if isinstance(event, Result):
            event.text = event.text.strip() if template.fallback else event.text
            event.info["template"] = {"fallback": template.fallback, "sha256": template.sha256,
                                      "end_of_turn": template.end_of_turn()}
            event.info["context"] = ctx
        yield event


def _reuse_prefix() -> bool:
    from engine.state import env_flag

    return env_flag("STUDIO_CHAT_PREFIX_CACHE", True)
