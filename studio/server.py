"""`studio serve`: a local HTTP API (Starlette on uvicorn) that existing clients speak, over the studio's queue.

OpenAI-compatible ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (server-sent events when
``stream``), ``/v1/images/generations``; AUTOMATIC1111-compatible ``/sdapi/v1/*``; the studio's own ``/api/jobs`` and
``/api/history``. Every generation is a queue job (engine/jobqueue.py) recorded in the same history as the GUI's.
Bound to 127.0.0.1 by default; any other interface needs a bearer token. Plugin install and model import have no
route here. The endpoint code is in studio/api_openai.py and studio/api_a1111.py (the prompt-length check in
studio/api_context.py).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
from typing import Optional

from engine.errors import ModelError, StudioError, UsageError
from engine.generators import digits

log = logging.getLogger(__name__)

MAX_BODY = 32 << 20  # bytes; an image as base64 fits, a 100 MB upload does not
LOOPBACK = ("localhost",)


class NotFound(UsageError):
    """An unknown model or job (HTTP 404); ``code`` is OpenAI's error code for it."""

    def __init__(self, message: str, code: str = "model_not_found"):
        super().__init__(message)
        self.code = code


class Unsupported(StudioError):
    """The endpoint needs a generator that is not installed (HTTP 501)."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Service:
    """What the endpoints share: the plugins, the models, the queue and the server's own queue worker."""

    def __init__(self, ray_address: Optional[str] = None):
        from engine.jobqueue import JobQueue
        from engine.jobsave import server_pin
        from engine.jobworker import InProcessExecutor, QueueWorker, recover
        from engine.plugins import PluginHost
        from engine.store import ModelStore

        from studio.api_context import ContextCheck

        self.host = PluginHost().load()
        self.store = ModelStore(self.host)
        self.context_check = ContextCheck()  # prompts longer than a model's context (each tokenizer loaded once)
        self.queue = JobQueue()
        recover(self.queue)
        self.pin = server_pin(self.queue.owner)  # this server's own jobs: another server on the same home (or
        # the next one after this one died) never takes them, and their messages reach the client waiting here
        self._lock = threading.Lock()
        self._waiting: dict = {}  # job id -> (loop, asyncio.Queue)
        executor = InProcessExecutor(self.host, self.store)
        if ray_address:
            from engine import state
            from engine.history import History
            from engine.raypool import RayExecutor, RayPool

            executor = RayExecutor(RayPool(ray_address, store=self.store), self.queue, self.host, self.store,
                                   History(), lambda: state.load_settings().outputs)
        self.worker = QueueWorker(self.queue, executor, pin=self.pin,
                                  on_message=self._on_message).start()

    def close(self) -> None:
        self.worker.stop()

    def _on_message(self, job_id: int, msg: dict) -> None:
        with self._lock:
            target = self._waiting.get(job_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, msg)

    # ----- jobs ---------------------------------------------------------------------------------
    def validate(self, job):
        """The job checked as the worker will run it (``engine.runner.Prepared``); UsageError / ModelError."""
        from engine.runner import prepare

        return prepare(self.host, self.store, job)

    def submit(self, job, loop, checked: bool = False) -> tuple:
        """Validate (unless ``checked`` already) and queue a job for the server's own worker; returns (job id, its
        message queue)."""
        if not checked:
            self.validate(job)
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the worker's first message waits for the registration
            job_id = self.queue.submit(job, source="api", pin=self.pin)
            self._waiting[job_id] = (loop, q)
        self.worker.wake()
        return job_id, q

    def forget(self, job_id: int) -> None:
        with self._lock:
            self._waiting.pop(job_id, None)

    def model_names(self, generator: Optional[str] = None) -> list:
        return [e.name for e in self.store.list() if generator is None or e.generator == generator]

    def check_model(self, name: Optional[str], generators: tuple) -> Optional[str]:
        """A model name a client sent: None/empty means the default; an unknown one is a 404."""
        if not name:
            return None
        if not isinstance(name, str):
            raise UsageError(f"\"model\" must be a model's name, not {type(name).__name__} (GET /v1/models lists "
                             "them).")
        other = None
        for entry in self.store.list():
            if entry.name == name and entry.generator in generators:
                return name
            if entry.name == name:
                other = entry
        if name in generators:  # the generator's id stands for its default model
            return None
        known = [n for g in generators for n in self.model_names(g)]
        if other is not None:  # there, but of another kind: not "does not exist" (GET /v1/models lists it)
            raise UsageError(f"The model {name!r} is a {other.generator} model, which this endpoint does not run; "
                             f"use one of {', '.join(known) or '(none installed)'}.")
        raise NotFound(f"The model {name!r} does not exist here; use one of {', '.join(known) or '(none installed)'} "
                       "(GET /v1/models lists them).")

    def has_generator(self, generator_id: str) -> bool:
        return generator_id in self.host.generators


async def run_job(service: Service, job, request=None, on_message=None, checked: bool = False) -> dict:
    """Queue ``job`` and wait for it; returns the ``finished`` message. A client that goes away cancels it.
    ``checked``: the caller has validated the job already (the worker checks it again when it runs)."""
    from starlette.concurrency import run_in_threadpool

    loop = asyncio.get_running_loop()
    submitting = asyncio.ensure_future(run_in_threadpool(service.submit, job, loop, checked))
    try:
        job_id, q = await asyncio.shield(submitting)
    except asyncio.CancelledError:  # the client left while the job was being queued: cancel it once it has an id
        submitting.add_done_callback(lambda f: f.cancelled() or f.exception() or _abandon(service, f.result()[0]))
        raise
    try:
        checked_at = loop.time()
        while True:
            msg = await next_item(q, 0.5)
            if request is not None and loop.time() - checked_at >= 0.5:  # also while messages keep coming
                checked_at = loop.time()
                if await request.is_disconnected():
                    raise ClientGone()
            if msg is None:
                continue
            kind = msg.get("type")
            if kind == "finished":
                return msg
            if kind == "failed":
                from engine.messages import raise_failure

                raise_failure(msg, "The generation failed.")
            if kind == "cancelled":
                from engine.errors import CancelledError

                raise CancelledError("The job was cancelled.")
            if on_message is not None:
                await on_message(msg)
    except BaseException:
        _cancel_quietly(service, job_id)
        raise
    finally:
        service.forget(job_id)


async def next_item(q: asyncio.Queue, seconds: float):
    """``q``'s next item, or None after ``seconds``. Not ``asyncio.wait_for``: on Python 3.11 it returns the item
    and swallows a cancel that comes as the item arrives, so a client that left could leave its job running."""
    getter = asyncio.ensure_future(q.get())
    try:
        await asyncio.wait((getter,), timeout=seconds)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


def _cancel_quietly(service: Service, job_id: int) -> None:
    try:
        if service.queue.get(job_id).state in ("queued", "running"):
            service.queue.cancel(job_id)
    except StudioError:
        pass


def _abandon(service: Service, job_id: int) -> None:
    _cancel_quietly(service, job_id)
    service.forget(job_id)


class ClientGone(Exception):
    """The HTTP client disconnected while its job ran (the job is cancelled)."""


# ----- errors, auth, limits ------------------------------------------------------------------------
def error_response(message: str, status: int, kind: str = "invalid_request_error", code: Optional[str] = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code},
                         "detail": message}, status_code=status)


def status_of(exc: BaseException) -> tuple:
    from engine.errors import CancelledError

    if isinstance(exc, NotFound):
        return 404, "invalid_request_error", exc.code
    if isinstance(exc, Unsupported):
        return 501, "not_implemented", None
    if isinstance(exc, CancelledError):
        return 499, "cancelled", None
    if isinstance(exc, (UsageError, ModelError)):
        return 400, "invalid_request_error", getattr(exc, "code", None)  # (context_length_exceeded)
    return 500, "server_error", None


async def read_json(request) -> dict:
    body = await request.body()
    try:
        data = json.loads(body or b"null", parse_float=_finite, parse_int=_whole)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"The request body is not valid JSON ({exc}).") from None
    except RecursionError:
        raise UsageError("The request body nests arrays or objects too deeply.") from None
    if not isinstance(data, dict):
        raise UsageError("The request body must be a JSON object.")
    return data


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: every field that takes a number would fail on infinity
        raise UsageError(f"The number {text[:20]} in the request body is too large.")
    return value


def _whole(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # past any seed or count (and Python's own digit limit)
        raise UsageError(f"The number {text[:20]}... in the request body is too large.")
    return int(text)


class TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the bearer token (when one is set) and the body size limit, before any endpoint runs."""

    def __init__(self, app, token: Optional[str], max_body: int):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token:
            given = headers.get("authorization", "")
            ok = given[:7].lower() == "bearer " and hmac.compare_digest(given[7:].strip().encode(),
                                                                        self.token.encode())  # (the scheme's case
            # does not matter, RFC 7235)
            if not ok:
                msg = ("A bearer token is required: send 'Authorization: Bearer <token>' with the token the server "
                       "was started with." if not given else "The bearer token is wrong.")
                return await error_response(msg, 401, "authentication_error", "invalid_api_key")(scope, receive, send)
        length = headers.get("content-length", "")
        if digits(length) and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        seen = [0]

        async def counted():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > self.max_body:
                    raise TooLarge()
            return msg

        try:
            await self.app(scope, counted, send)
        except TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope, receive, send):
        msg = f"The request body is larger than the server's limit of {self.max_body >> 20} MB."
        await error_response(msg, 413, code="body_too_large")(scope, receive, send)


def create_app(token: Optional[str] = None, max_body: int = MAX_BODY, service: Optional[Service] = None):
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException

    from studio import api_a1111, api_jobs, api_openai

    holder: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        app.state.service = service or Service()
        holder["service"] = app.state.service
        api_a1111.restore_checkpoint(app.state.service)
        try:
            yield
        finally:
            app.state.service.close()

    async def studio_error(request, exc):
        status, kind, code = status_of(exc)
        return error_response(str(exc), status, kind, code)

    async def http_error(request, exc):
        detail = exc.detail if isinstance(exc.detail, str) else "Not found."
        if exc.status_code == 404:
            detail = f"There is no endpoint {request.method} {request.url.path} on this server."
        return error_response(detail, exc.status_code)

    async def unexpected(request, exc):
        log.exception("request failed")
        return error_response(f"The server failed: {type(exc).__name__}: {exc}", 500, "server_error")

    async def too_large(request, exc):  # a chunked body past the limit, found while an endpoint read it
        return error_response(f"The request body is larger than the server's limit of {max_body >> 20} MB.", 413,
                              code="body_too_large")

    async def gone(request, exc):  # no one reads the answer; the job is cancelled (no traceback in the log)
        return error_response("The client went away; its job was cancelled.", 499, "cancelled")

    routes = api_openai.routes() + api_a1111.routes() + api_jobs.routes()
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={StudioError: studio_error, HTTPException: http_error, ClientGone: gone,
                                        TooLarge: too_large, Exception: unexpected})
    return Guard(app, token, max_body)


def serve(args) -> int:
    import uvicorn

    token = args.token or os.environ.get("STUDIO_API_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise UsageError(f"Listening on {args.host} (not this machine only) needs a bearer token: pass --token or "
                         "set STUDIO_API_TOKEN.")
    if not 0 < args.port < 65536:
        raise UsageError(f"The port must be from 1 to 65535, not {args.port}.")
    sock = listen_socket(args.host, args.port)  # before anything else: a port in use is one line, not a traceback
    service = Service(args.ray) if args.ray else None  # joins the cluster now: a bad address is one line
    print(f"studio serve: listening on http://{args.host}:{args.port} "
          f"({'token required' if token else 'no token: this machine only'})", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(token, service=service), log_level="warning")).run(sockets=[sock])
    return 0


def listen_socket(host: str, port: int):
    """A socket bound to ``host:port`` (uvicorn listens on it); UsageError in one sentence when it cannot be."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"The host {host!r} is not a name or address this machine knows ({exc.strerror}); use "
                         "127.0.0.1, 0.0.0.0 or one of its addresses.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"Port {port} on {host} is already in use (another `studio serve`, or another "
                             "program); stop it or choose another --port.") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"This user may not listen on port {port}; use a port from 1024 up.") from None
        raise UsageError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); use 127.0.0.1, 0.0.0.0 or one "
                         "of this machine's addresses.") from None
    sock.set_inheritable(True)
    return sock
