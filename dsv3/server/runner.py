"""Running one HTTP request's engine requests: several prompts (or one) at once, aborted together.

A completions request with a list of prompts is one engine request per prompt; their outputs arrive on
one queue in the order the engine produces them. Leaving the iteration early (a client disconnect, an
error, a cancelled task) aborts every engine request that has not finished, so its blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable

from starlette.requests import Request

from dsv3.server.metrics import RequestTimer

log = logging.getLogger("dsv3.server")

_DONE = object()


class ServerShuttingDown(Exception):
    """The server was told to stop (SIGTERM) and its grace period ran out before this request finished."""


class RequestGroup:
    """The engine requests of one HTTP request.

    Args:
        engine: the AsyncEngine.
        request_id: the HTTP request's id; engine request i is f"{request_id}-{i}".
        prompts: token ids per prompt.
        params: the SamplingParams all prompts share.
        timer: the latency metrics to observe.
    """

    def __init__(self, engine, request_id: str, prompts: list[list[int]], params, timer: RequestTimer):
        self.engine, self.params, self.timer = engine, params, timer
        self.ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self.prompts = prompts
        self._finished: set[str] = set()
        self._tokens = [0] * len(prompts)
        self._reasons: list[str | None] = [None] * len(prompts)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self.started = False  # an output (a first token) has come: it no longer waits (--max-waiting-requests)

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, RequestOutput) as outputs arrive; raises the first engine error.

        Outputs are cumulative, so when several of one prompt are waiting (the client reads slower than the
        engine steps) only the latest is handed on: one chunk instead of several, less work when loaded.
        """
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.prompts))]
        try:
            running = len(self._tasks)
            while running:
                batch = [await self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                latest = {index: position for position, (index, item) in enumerate(batch)
                          if item is not _DONE and not isinstance(item, BaseException)}
                for position, (index, item) in enumerate(batch):
                    if item is _DONE:
                        running -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    elif latest[index] == position:
                        self._observe(index, item)
                        yield index, item
        finally:
            await self.close()

    def end(self, error: BaseException) -> None:
        """End the iteration of outputs() with `error` (its engine requests are aborted as it closes)."""
        self._queue.put_nowait((-1, error))

    async def _pump(self, index: int) -> None:
        try:
            group = self.ids[0].rsplit("-", 1)[0]  # the HTTP request: its prompts share the slots as one
            async for output in self.engine.generate(self.prompts[index], self.params, self.ids[index], group):
                if output.finished:
                    self._finished.add(self.ids[index])
                await self._queue.put((index, output))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # handed to the consumer, which answers the HTTP request with it
            self._finished.add(self.ids[index])
            self._reasons[index] = "error"
            await self._queue.put((index, error))
        await self._queue.put((index, _DONE))

    def _observe(self, index: int, output) -> None:
        self.started = True
        self._tokens[index] = sum(len(c.token_ids) for c in output.outputs)
        self.timer.tokens(sum(self._tokens))
        if output.finished:
            self._reasons[index] = next((c.finish_reason for c in output.outputs if c.finish_reason), None)

    async def close(self) -> None:
        """Cancel what still runs and abort its engine requests; records the end-to-end latency once."""
        if self.timer is None:
            return
        # counted before anything is awaited: a stream the client dropped closes in a cancelled task, whose
        # next await raises before it could count the request as aborted
        reasons = [r for r in self._reasons if r]
        self.timer.finish(reasons[0] if len(reasons) == len(self._reasons) else "abort")
        self.timer = None
        for task in self._tasks:
            task.cancel()
        for request_id in self.ids:
            if request_id not in self._finished:
                try:
                    await self.engine.abort(request_id)
                except Exception:  # the request may be gone already; aborting is best effort
                    log.exception("aborting %s failed", request_id)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Await `work`, cancelling it if the client disconnects first (returns None then)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
