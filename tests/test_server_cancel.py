"""A client that leaves always cancels its job: the races of studio.server.run_job, driven without a server."""
import asyncio
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")

from studio.server import next_item, run_job  # noqa: E402


class FakeService:
    """What run_job uses of studio.server.Service; ``submit`` waits for ``release`` (a slow queue database)."""

    def __init__(self, slow: bool = False):
        self.release = threading.Event()
        if not slow:
            self.release.set()
        self.cancelled, self.forgotten, self.queues = [], [], {}
        self.queue = SimpleNamespace(get=lambda job_id: SimpleNamespace(state="running"),
                                     cancel=self.cancelled.append)

    def submit(self, job, loop, checked=False):
        self.release.wait(10)
        self.queues[7] = asyncio.Queue()
        return 7, self.queues[7]

    def forget(self, job_id):
        self.forgotten.append(job_id)


def test_a_cancel_that_comes_with_an_item_is_not_swallowed():
    async def main():
        q = asyncio.Queue()
        task = asyncio.ensure_future(next_item(q, 5))
        await asyncio.sleep(0.01)
        q.put_nowait("token")  # asyncio.wait_for on Python 3.11 returned it and the cancel was lost
        task.cancel()
        await asyncio.wait((task,), timeout=5)
        assert task.cancelled()

    asyncio.run(main())


def test_a_client_leaving_as_a_token_arrives_cancels_its_job():
    async def main():
        service = FakeService()
        task = asyncio.ensure_future(run_job(service, {"generator": "text"}))
        while 7 not in service.queues:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        service.queues[7].put_nowait({"type": "text", "text": "a"})
        task.cancel()
        await asyncio.wait((task,), timeout=5)
        assert task.cancelled() and service.cancelled == [7] and service.forgotten == [7]

    asyncio.run(main())


def test_a_client_leaving_while_its_job_is_being_queued_cancels_it():
    async def main():
        service = FakeService(slow=True)
        task = asyncio.ensure_future(run_job(service, {"generator": "text"}))
        await asyncio.sleep(0.05)  # submit is still running in its thread
        task.cancel()
        await asyncio.wait((task,), timeout=5)
        assert task.cancelled()
        service.release.set()  # the job reaches the queue after the client left
        for _ in range(200):
            if service.cancelled:
                break
            await asyncio.sleep(0.01)
        assert service.cancelled == [7] and service.forgotten == [7]

    asyncio.run(main())
