"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions, /v1/images/generations."""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

from engine.errors import OptionError, UsageError
from engine.generators import digits
from studio.server import ClientGone, NotFound, Unsupported, next_item, read_json, run_job

TEXT_GENERATORS = ("text", "chat")
UNSUPPORTED = ("echo", "logprobs", "top_logprobs", "suffix", "logit_bias", "tools", "functions")  # refused when set


def routes() -> list:
    from starlette.routing import Route

    return [Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"])]


def _model_object(entry) -> dict:
    return {"id": entry.name, "object": "model", "created": 0, "owned_by": "studio", "generator": entry.generator}


async def models(request):
    from starlette.responses import JSONResponse

    return JSONResponse({"object": "list", "data": [_model_object(e) for e in request.app.state.service.store.list()]})


async def model(request):
    """GET /v1/models/{id} (``client.models.retrieve``)."""
    from starlette.responses import JSONResponse

    name = request.path_params["name"]
    for entry in request.app.state.service.store.list():
        if entry.name == name:
            return JSONResponse(_model_object(entry))
    raise NotFound(f"The model {name!r} does not exist here (GET /v1/models lists them).")


def _number(body: dict, key: str, kind: type, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):  # (float(v) rounds a large int)
        raise UsageError(f"{key} must be a {'whole number' if kind is int else 'number'}, not {value!r}.")
    return kind(value)


def _stop(value) -> str:
    """OpenAI's ``stop`` (a string or up to 4) as the text generator's ``stop`` option (``|``-separated)."""
    if value is None:
        return ""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 4:
        raise UsageError("stop must be a string or a list of at most 4 strings.")
    esc = [s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\t", "\\t") for s in items if s]
    return "|".join(esc)


MAX_N = 8  # completions per prompt (``n``)
MAX_PROMPTS = 16  # prompts in one /v1/completions request


def _text_options(body: dict, default_max: int) -> dict:
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, 0, "", [], {}):
            raise UsageError(f"{key} is not supported by this server; leave it out.")
    if _number(body, "best_of", int, 1) != 1:
        raise UsageError("best_of must be 1 here.")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type", "text") == "text"):
        raise UsageError("response_format must be {\"type\": \"text\"} here (no JSON mode or schemas); leave it out.")
    for key in ("stream", "echo"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise UsageError(f"{key} must be true or false, not {body[key]!r}.")
    top_k = _number(body, "top_k", int, 0)  # vLLM's extra; OpenAI samples among all tokens (-1 or 0 here)
    opts = {"max_new_tokens": _number(body, "max_tokens", int, default_max),
            "temperature": _number(body, "temperature", float, 1.0),
            "top_p": _number(body, "top_p", float, 1.0), "stop": _stop(body.get("stop")),
            "top_k": 0 if top_k == -1 else top_k,
            "repetition_penalty": _number(body, "repetition_penalty", float, 1.0),
            "presence_penalty": _number(body, "presence_penalty", float, 0.0),
            "frequency_penalty": _number(body, "frequency_penalty", float, 0.0)}
    if body.get("max_completion_tokens") is not None:
        opts["max_new_tokens"] = _number(body, "max_completion_tokens", int)
    if opts["temperature"] == 0:
        opts["temperature"] = 0.0
    return opts


def _jobs(body: dict, default_max: int, prompts: list, **fields) -> list:
    """One job per prompt and per ``n``: choice ``p * n + k`` is prompt ``p``'s ``k``-th, with seed ``seed + k``
    (so a prompt in a list gets the text it would get alone)."""
    from engine.runner import Job, nth_seed

    n = _number(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise UsageError(f"n must be from 1 to {MAX_N}, not {n}.")
    options, seed = _text_options(body, default_max), _number(body, "seed", int)
    return [Job(prompt=prompt, seed=nth_seed(seed, k), options=dict(options), **fields)
            for prompt in prompts for k in range(n)]


def _finish_reason(recipe: dict) -> str:
    return {"eos": "stop", "stop": "stop"}.get((recipe.get("info") or {}).get("stopped_by"), "length")


def _usage(recipes: list, n: int) -> dict:
    """Token counts of a request: each prompt counted once, every completion."""
    p = c = 0
    for i, recipe in enumerate(recipes):
        info = recipe.get("info") or {}
        p += int(info.get("prompt_tokens") or 0) if i % n == 0 else 0
        c += int(info.get("new_tokens") or len(recipe.get("token_ids") or []))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def completions(request):
    service = request.app.state.service
    body = await read_json(request)
    prompts = body.get("prompt", "")
    prompts = prompts if isinstance(prompts, list) else [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UsageError("prompt must be a string or a list of strings (token ids are not taken).")
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"prompt holds {len(prompts)} prompts; the limit is {MAX_PROMPTS} a request.")
    model = service.check_model(body.get("model"), ("text",))
    jobs = _jobs(body, 16, prompts, generator="text", model=model)
    return await _respond(request, service, jobs, body, "text_completion", chat=False)


async def chat_completions(request):
    service = request.app.state.service
    body = await read_json(request)
    if not service.has_generator("chat"):
        raise Unsupported("Chat completions need the studio's chat generator, which is not installed in this "
                          "version; use /v1/completions.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UsageError("messages must be a non-empty list of {role, content} objects.")
    model = service.check_model(body.get("model"), TEXT_GENERATORS)
    messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]
    jobs = _jobs(body, 256, [None], generator="chat", model=model, messages=messages)
    return await _respond(request, service, jobs, body, "chat.completion", chat=True)


async def _respond(request, service, jobs: list, body: dict, kind: str, chat: bool):
    """Run ``jobs`` one after another (choice ``i`` is job ``i``), as one JSON answer or as one event stream."""
    from starlette.responses import JSONResponse, StreamingResponse

    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    from starlette.concurrency import run_in_threadpool

    # every choice is checked before the first runs (and before a stream starts)
    try:
        prepared = [await run_in_threadpool(service.validate, job) for job in jobs]
    except OptionError as exc:  # named as the client sent it ("max_tokens", not the studio's "max_new_tokens")
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise UsageError(str(exc).replace("Option max_new_tokens", field)) from None
    model = prepared[0].request.model
    created, model_name = int(time.time()), model.name if model else (body.get("model") or jobs[0].generator)
    n = _number(body, "n", int, 1)
    prompts = len(prepared) // n
    for p in range(prompts):  # one that is too long for the context: 400, as OpenAI answers (never cut)
        await run_in_threadpool(service.context_check.check, prepared[p * n].request,
                                f"Prompt {p + 1} of {prompts}" if prompts > 1 else "")

    def chunk(index, piece=None, finish=None, role=False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "system_fingerprint": None, "choices": [choice]}
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"text": piece or "", "index": index, "logprobs": None, "finish_reason": finish}]}

    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):  # checked before the stream starts (it broke the stream midway)
        raise UsageError("stream_options must be an object, such as {\"include_usage\": true}.")
    if not body.get("stream"):
        choices, recipes = [], []
        for index, job in enumerate(jobs):
            r = (await run_job(service, job, request, checked=True))["recipe"]
            recipes.append(r)
            extra = {"finish_reason": _finish_reason(r), "logprobs": None, "history_id": r.get("history_id")}
            choices.append({"index": index, "message": {"role": "assistant", "content": r.get("text", "")}, **extra}
                           if chat else {"text": r.get("text", ""), "index": index, **extra})
        return JSONResponse({"id": cid, "object": kind, "created": created, "model": model_name,
                             "system_fingerprint": None, "choices": choices, "usage": _usage(recipes, n)})

    async def events():
        import asyncio

        recipes = []
        for index, job in enumerate(jobs):
            out: asyncio.Queue = asyncio.Queue()

            async def on_message(msg, out=out, index=index):
                if msg.get("type") == "text":
                    await out.put(_sse(chunk(index, msg["text"])))

            if chat:
                yield _sse(chunk(index, role=True))
            task = asyncio.ensure_future(run_job(service, job, request, on_message, checked=True))
            try:
                while not (task.done() and out.empty()):
                    event = await next_item(out, 0.2)
                    if event is not None:
                        yield event
                try:
                    finished = task.result()
                except ClientGone:
                    return
                except Exception as exc:  # noqa: BLE001 - the stream has begun: the error is an event
                    yield _sse({"error": {"message": str(exc), "type": "server_error"}})
                    return
            finally:
                if not task.done():
                    task.cancel()  # the client went away: run_job cancels the queue job
            recipes.append(finished["recipe"])
            yield _sse(chunk(index, finish=_finish_reason(finished["recipe"])))
        if stream_options.get("include_usage"):  # OpenAI: one more chunk, with no choices
            yield _sse({**chunk(0), "choices": [], "usage": _usage(recipes, n)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def images(request):
    from starlette.responses import JSONResponse

    service = request.app.state.service
    body = await read_json(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("prompt must be a non-empty string.")
    if body.get("response_format", "b64_json") != "b64_json":
        raise UsageError("Only response_format b64_json is served (this server keeps no public URLs).")
    n = _number(body, "n", int, 1)
    if not 1 <= n <= 8:
        raise UsageError(f"n must be from 1 to 8, not {n}.")
    generator, model = image_generator(service, body.get("model"))
    seed = _number(body, "seed", int)
    options = _size(body.get("size"), {o.name for o in service.host.generator(generator).info.options})
    data = []
    from engine.runner import Job, nth_seed

    for i in range(n):
        job = Job(generator, prompt=prompt, model=model, options=dict(options), seed=nth_seed(seed, i))
        finished = await run_job(service, job, request)
        png = Path(finished["files"][0]).read_bytes()
        data.append({"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": prompt})
    return JSONResponse({"created": int(time.time()), "data": data})


def _size(size, options: set) -> dict:
    """OpenAI's ``size`` ("512x768") as width and height, for a generator that has them (a fixed-size one, such as
    the 32 x 32 shapes model, makes its own size)."""
    if size in (None, "", "auto"):
        return {}
    w, sep, h = str(size).partition("x")
    if not (sep and digits(w) and digits(h)):
        raise UsageError(f"size must be WIDTHxHEIGHT, such as 512x512, not {size!r}.")
    return {"width": int(w), "height": int(h)} if {"width", "height"} <= options else {}


def image_generator(service, model_name) -> tuple:
    """(generator id, model) for an image request: the model's own generator, else the ``image`` generator."""
    if model_name:
        for entry in service.store.list():
            if entry.name == model_name:
                if service.host.generator(entry.generator).info.makes != "image":
                    raise UsageError(f"Model {model_name} makes {service.host.generator(entry.generator).info.makes}, "
                                     "not images.")
                return entry.generator, model_name
        if not service.has_generator(model_name):
            raise NotFound(f"The model {model_name!r} does not exist here (GET /v1/models lists them).")
        makes = service.host.generator(model_name).info.makes
        if makes != "image":  # a text generator's answer came back as the "image" (base64 text)
            raise UsageError(f"Generator {model_name} makes {makes}, not images; name an image model.")
        return model_name, None
    if not service.has_generator("image"):
        raise Unsupported("No image generator is installed.")
    return "image", None
