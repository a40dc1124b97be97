"""The studio's own endpoints: /api/jobs (the queue) and /api/history."""
from __future__ import annotations

from engine.errors import UsageError
from studio.server import NotFound, read_json


def routes() -> list:
    from starlette.routing import Route

    return [Route("/api/jobs", jobs, methods=["GET", "POST"]),
            Route("/api/jobs/{id:int}", job, methods=["GET"]),
            Route("/api/jobs/{id:int}/{action}", job_action, methods=["POST"]),
            Route("/api/queue/{action}", queue_action, methods=["POST"]),
            Route("/api/history", history, methods=["GET"]),
            Route("/api/history/{id:int}", history_entry, methods=["GET"])]


def _json(obj, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status)


async def jobs(request):
    from starlette.concurrency import run_in_threadpool

    from engine.runner import job_from_dict

    service = request.app.state.service
    if request.method == "GET":
        everything = request.query_params.get("all") in ("1", "true", "yes")
        listed = service.queue.list() if everything else service.queue.list(states=("running", "queued"))
        return _json({"paused": service.queue.paused(), "jobs": [j.to_dict() for j in listed]})
    body = await read_json(request)
    front = body.pop("front", None)
    front = False if front is None else front  # null is left out, as for every job field
    if not isinstance(front, bool):
        raise UsageError("front must be true or false.")
    new = job_from_dict(body)
    await run_in_threadpool(service.validate, new)
    job_id = service.queue.submit(new, source="api", front=front)
    service.worker.wake()
    return _json({"id": job_id, "state": "queued"}, 201)


def _existing(queue, job_id: int):
    try:
        return queue.get(job_id)
    except UsageError as exc:  # "There is no job N in the queue."
        raise NotFound(str(exc), "job_not_found") from None


async def job(request):
    return _json(_existing(request.app.state.service.queue, request.path_params["id"]).to_dict())


async def job_action(request):
    queue = request.app.state.service.queue
    job_id, action = request.path_params["id"], request.path_params["action"]
    _existing(queue, job_id)
    if action == "cancel":
        return _json({"id": job_id, "state": queue.cancel(job_id)})
    if action == "retry":
        queue.retry(job_id)
    elif action == "front":
        queue.to_front(job_id)
    elif action == "move":
        body = await read_json(request)
        position = body.get("position")
        if not isinstance(position, int) or isinstance(position, bool):
            raise UsageError("move needs {\"position\": N}, a whole number (0 = next to run).")
        queue.move(job_id, position)
    else:
        raise UsageError(f"Unknown job action {action!r}; use cancel, retry, front or move.")
    return _json(queue.get(job_id).to_dict())


async def queue_action(request):
    queue = request.app.state.service.queue
    action = request.path_params["action"]
    if action not in ("pause", "resume"):
        raise UsageError(f"Unknown queue action {action!r}; use pause or resume.")
    queue.set_paused(action == "pause")
    return _json({"paused": queue.paused()})


async def history(request):
    from engine.history import History

    try:
        limit = int(request.query_params.get("limit", 50))
    except ValueError:
        raise UsageError("limit must be a whole number.") from None
    if not 1 <= limit <= 1000:
        raise UsageError(f"limit must be from 1 to 1000, not {limit}.")
    entries = History().list(limit=limit, search=request.query_params.get("search", ""),
                             generator=request.query_params.get("generator", ""))
    return _json([e.to_dict() for e in entries])


async def history_entry(request):
    from engine.history import History

    try:
        entry = History().get(request.path_params["id"])
    except UsageError as exc:  # "There is no generation N in the history.": a 404, as for a job
        raise NotFound(str(exc), "generation_not_found") from None
    return _json(entry.to_dict())
