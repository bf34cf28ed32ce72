"""The engine thread: one loop steps the LLMEngine for every caller, in asyncio or in plain threads.

Callers hand requests over through a command queue; the loop applies adds and aborts between steps,
steps while any request is unfinished, and delivers each output to its request's sink (an asyncio
queue through call_soon_threadsafe, or a thread's queue). Requests are validated in the caller's
thread, so a bad one raises RequestError before any output. An abort returns once the request's blocks
are free. A failure of one request ends only that request (LLMEngine isolates it); if a step itself
breaks, its requests fail with the message and the loop goes on.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

from dsv3.errors import EngineRequestError
from dsv3.serving.engine import EngineStats, LLMEngine
from dsv3.serving.outputs import RequestOutput
from dsv3.serving.params import SamplingParams
from dsv3.serving.workers import RankFailure

log = logging.getLogger(__name__)

Sink = Callable[[object], None]  # takes a RequestOutput or an exception

#: an engine thread with nothing to do for this long ends (a thread would keep its model alive)
IDLE_EXIT_SECONDS = 2.0

#: every loop alive, shut down when the interpreter exits: an engine thread still waiting (or running
#: torch) while the interpreter tears down aborts the process ("terminate called ...", exit 134)
_LOOPS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shut_down_every_loop() -> None:
    for loop in list(_LOOPS):
        loop.shutdown()


class EngineLoop:
    """Owns the engine thread (started by the first request, ended after IDLE_EXIT_SECONDS without work).

    Args:
        engine: the engine it drives; nothing else may touch it while the loop runs.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: list[tuple] = []
        self._sinks: dict[str, Sink] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._stats = engine.stats()
        self._ids = itertools.count()
        #: why the engine stopped for good (a rank failed), or None
        self.failure: str | None = None
        #: called with that reason when it happens (the server stops on it)
        self.on_failure: list[Callable[[str], None]] = []
        _LOOPS.add(self)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None,
               sink: Sink, group: str = "") -> None:
        """Validate (LLMEngine.check_request: RequestError now for a bad one) and queue a request; its outputs
        go to `sink`; `group` as LLMEngine.add_request takes it."""
        resolved = self.engine.check_request(prompt_token_ids, params)
        with self._cond:
            if self._shutdown:
                raise EngineRequestError("the engine is shut down")
            self.engine.check_request_id(request_id, running=self._sinks)
            self._sinks[request_id] = sink
            self._commands.append(("add", request_id, list(prompt_token_ids), resolved, group))
            self._start()
            self._cond.notify()

    def abort(self, request_id: str, wait: bool = True) -> None:
        """End a request; with `wait`, return once its blocks are free."""
        done = threading.Event()
        with self._cond:
            if request_id not in self._sinks or self._shutdown:
                return
            self._commands.append(("abort", request_id, done))
            self._start()
            self._cond.notify()
        if wait:
            done.wait()

    def stats(self) -> EngineStats:
        """The engine's stats as of its latest step (a snapshot taken by the loop)."""
        return self._stats

    def shutdown(self) -> None:
        """Stop the loop (unfinished requests fail) and the engine's other ranks, if any."""
        with self._cond:
            self._shutdown = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # after a rank failed, the thread may wait in a collective that never ends
            thread.join(None if self.failure is None else 5.0)
        if self.failure is None:
            self.engine.close()

    def fail(self, error: Exception) -> None:
        """The engine cannot go on (a rank failed): every request fails now with `error` (a 500), new ones
        are refused, and the on_failure hooks run. Safe from any thread; the engine thread may be stuck."""
        with self._cond:
            if self.failure is not None:
                return
            self.failure = str(error)
            log.error("%s; failing every request and stopping every rank", error)
            self._shutdown = True
            self._cond.notify()
            sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            _call(sink, EngineRequestError(str(error)))
        for hook in self.on_failure:
            hook(str(error))

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_or_fail, name="dsv3-engine", daemon=True)
            self._thread.start()

    def _run_or_fail(self) -> None:
        """The loop; should it break outside a step (where nothing isolates the failure), the engine fails for
        good (`fail`): every caller hears why, new requests are refused and the server's /health answers 503."""
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - said to every caller and to /health, not swallowed
            log.exception("the engine loop died")
            with self._cond:
                commands, self._commands = self._commands, []
            for command in commands:
                if command[0] == "abort":
                    command[2].set()
            self.fail(EngineRequestError(f"the engine loop died: {type(e).__name__}: {e}"))

    def _run(self) -> None:
        engine = self.engine
        pending = []  # the requests the latest step changed: their outputs go out once the next step is launched
        while True:
            with self._cond:
                if engine.idle and engine.has_unfinished_requests() and not self._commands:
                    self._cond.wait(0.01)  # requests that cannot run yet: no busy loop
                while not self._commands and not engine.has_unfinished_requests() and not self._shutdown:
                    if not self._cond.wait(IDLE_EXIT_SECONDS) and not self._commands \
                            and not engine.has_unfinished_requests() and not self._shutdown:
                        self._thread = None  # idle: the next request starts a new thread; the model can be freed
                        return
                if self._shutdown:
                    commands, self._commands = self._commands, []
                    break
                commands, self._commands = self._commands, []
            for command in commands:
                self._apply(command)
            if engine.has_unfinished_requests():
                previous, pending = pending, []
                try:
                    # the previous step's outputs go out once this one is launched, while it runs on the
                    # device: the callers' threads (an asyncio loop taking the GIL to handle them) no longer
                    # delay the launch; before a step that runs eagerly, as they would wait for all of it
                    launched = engine.launch_step(functools.partial(self._deliver_requests, previous))
                    self._deliver_requests(previous)
                    pending = engine.finish_step(launched)
                except RankFailure as e:  # the ranks are out of step: nothing more can run
                    self.fail(e)
                    break
                except Exception as e:  # noqa: BLE001 - a broken step fails its requests, not the loop
                    log.exception("an engine step failed; its requests fail with: %s", e)
                    self._deliver_requests(previous)  # where the launch raised
                    try:
                        self._deliver_step(self._fail_all(e))
                    except Exception:  # noqa: BLE001 - the loop still runs; said, not swallowed
                        log.exception("failing the requests of a broken step failed too")
                self._stats = engine.stats()  # before the outputs: a caller who sees its request end sees it gone
            if engine.idle or not engine.has_unfinished_requests():
                self._deliver_requests(pending)  # no step to overlap with: out now
        self._deliver_requests(pending)
        for command in commands:  # shut down: nothing more runs
            if command[0] == "abort":
                command[2].set()
        for request_id in list(engine.requests):
            engine.abort(request_id)
        for request_id in list(self._sinks):
            self._deliver(request_id, EngineRequestError("the engine was shut down"), True)
        self._stats = engine.stats()

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, group = command
            try:
                self.engine.add_request(request_id, prompt, params, group=group)
            except Exception as e:  # noqa: BLE001
                self._deliver(request_id, e, True)
            self._stats = self.engine.stats()
        else:
            _, request_id, done = command
            output = self.engine.abort(request_id)
            self._stats = self.engine.stats()
            if output is not None:
                self._deliver(request_id, output, True)
            done.set()

    def _fail_all(self, error: Exception) -> list[RequestOutput]:
        outputs = [self.engine.fail(request_id, error) for request_id in list(self.engine.requests)]
        return [output for output in outputs if output is not None]

    def _deliver_requests(self, requests: list) -> None:
        """The outputs of the requests a step changed (LLMEngine.finish_step), delivered once: the list empties."""
        if requests:
            outputs = self.engine.outputs(requests)
            requests.clear()
            self._deliver_step(outputs)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one wake-up per asyncio event loop for all its requests, not one per request."""
        by_loop: dict = {}
        for output in outputs:
            with self._cond:
                sink = self._sinks.pop(output.request_id, None) if output.finished else \
                    self._sinks.get(output.request_id)
            if isinstance(sink, AsyncSink):
                by_loop.setdefault(sink.loop, []).append((sink.inbox, output))
            elif sink is not None:
                _call(sink, output)
        for loop, items in by_loop.items():
            _call(loop.call_soon_threadsafe, _put_all, items)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        with self._cond:
            sink = self._sinks.pop(request_id, None) if last else self._sinks.get(request_id)
        if sink is not None:
            _call(sink, item)

    # ---- plain threads -----------------------------------------------------------------------------

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None,
               request_id: str | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request in the calling thread; EngineRequestError where the engine failed it."""
        request_id = request_id or self.new_request_id()
        inbox: queue.Queue = queue.Queue()
        self.submit(request_id, prompt_token_ids, params, inbox.put)
        finished = False
        try:
            while not finished:
                output = _checked(inbox.get())
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)


class AsyncSink:
    """Where an asyncio caller's outputs go: its event loop and its request's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue):
        self.loop, self.inbox = loop, inbox

    def __call__(self, item) -> None:
        self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)


def _put_all(items) -> None:
    for inbox, item in items:
        inbox.put_nowait(item)


def _call(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a caller gone (its event loop closed) must not stop the loop
        pass


def _checked(item) -> RequestOutput:
    if isinstance(item, BaseException):
        raise item
    if item.error is not None:
        raise EngineRequestError(item.error)
    return item


class AsyncEngine:
    """The engine for asyncio callers (the HTTP server, bench serve).

    Args:
        loop: the engine loop (one per model; Model.engine shares it with the sync API).
        tokenizer: the checkpoint's dsv3 Tokenizer, or None.
        model_config: the model's ModelConfig.
    """

    def __init__(self, loop: EngineLoop, tokenizer=None, model_config=None):
        self.loop, self.tokenizer, self.model_config = loop, tokenizer, model_config
        self.max_model_len = loop.engine.max_model_len
        self.generation_defaults = dict(loop.engine.generation_defaults)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams | None) -> SamplingParams:
        """The engine's check of a request (LLMEngine.check_request): RequestError naming the field."""
        return self.loop.engine.check_request(prompt_token_ids, params)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None,
                       request_id: str, group: str = "") -> AsyncIterator[RequestOutput]:
        """One output per engine step with news, the last with finished=True. Raises RequestError for a
        bad request (before any output) and EngineRequestError where the engine failed it. Requests of one
        `group` (the prompts of one HTTP request) share the scheduler's slots as one request."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        self.loop.submit(request_id, prompt_token_ids, params, AsyncSink(loop, inbox), group)
        finished = False
        try:
            while not finished:
                output = _checked(await inbox.get())
                finished = output.finished
                yield output
        finally:
            if not finished:  # the caller went away (cancelled, disconnected): free its blocks
                self.loop.abort(request_id, wait=False)

    async def abort(self, request_id: str) -> None:
        """End a request; returns once its blocks are free."""
        await asyncio.to_thread(self.loop.abort, request_id)

    def stats(self) -> EngineStats:
        return self.loop.stats()

    @property
    def error(self) -> str | None:
        """Why the engine stopped for good (its loop died, or a rank failed); None while it can serve."""
        return self.loop.failure

    def shutdown(self) -> None:
        self.loop.shutdown()
