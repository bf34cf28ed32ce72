"""Chat templates rendered in worker processes, each render bounded in time, off the server's event loop.

A chat template is code from the checkpoint: one that loops (or is just slow on a large conversation)
would hold the event loop, and with it /health, every stream and SIGTERM, for as long as it runs. Here
each render goes, from a thread, to an idle worker (dsv3/server/render_worker.py run as a script:
Python and jinja2, no torch); past `timeout` seconds the worker is killed (a new one starts for the next
render) and the request gets a 400. A worker
also has a memory limit, so `{{ 'x' * 10**12 }}` fails as that request's error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import subprocess
import sys
import threading
from pathlib import Path

from dsv3.errors import RequestError
from dsv3.server.chat_template import ChatTemplate, check_template_kwargs
from dsv3.server.runner import ServerShuttingDown

log = logging.getLogger("dsv3.server")

WORKER = Path(__file__).with_name("render_worker.py")
#: address space a worker may use (Python and jinja2 take about 50 MB of it)
WORKER_MEMORY_BYTES = 2 << 30


class RenderPool:
    """Renders `template` in up to `num_workers` processes at once, each started on first need.

    Args:
        template: the server's chat template.
        timeout: seconds one render may take.
        max_output_chars: a longer rendered prompt is refused (it could not fit the context anyway).
        num_workers: renders that run at once.
    """

    def __init__(self, template: ChatTemplate, timeout: float, max_output_chars: int, num_workers: int = 2):
        self.template, self.timeout = template, timeout
        self._setup = (json.dumps({"templates": template.sources, "special_tokens": template.special_tokens,
                                   "origin": template.origin, "max_output_chars": max_output_chars,
                                   "memory_bytes": WORKER_MEMORY_BYTES}) + "\n").encode()
        self._slots = threading.BoundedSemaphore(num_workers)
        self._lock = threading.Lock()
        self._idle: list[subprocess.Popen] = []
        self._workers: set[subprocess.Popen] = set()
        self._closed = False

    async def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                     kwargs: dict | None = None) -> str:
        """As ChatTemplate.render (`kwargs`: its further template variables), in a worker; RequestError also
        where it takes longer than the timeout."""
        kwargs = kwargs or {}
        check_template_kwargs(kwargs)
        request = json.dumps({"messages": messages, "tools": tools, "add_generation_prompt": add_generation_prompt,
                              "kwargs": kwargs}) + "\n"
        reply = await asyncio.to_thread(self._exchange, request.encode())
        if "error" in reply:
            raise RequestError(reply["error"], param="messages")
        return reply["text"]

    def close(self) -> None:
        """Kill every worker (a render in progress ends with an error)."""
        with self._lock:
            self._closed = True
            workers, self._workers, self._idle = list(self._workers), set(), []
        for worker in workers:
            _kill(worker)

    def _exchange(self, request: bytes) -> dict:
        with self._slots:
            worker = self._take()
            reply = None
            try:
                worker.stdin.write(request)
                worker.stdin.flush()
                readable, _, _ = select.select([worker.stdout], [], [], self.timeout)
                if not readable:
                    raise RequestError(f"the chat template ({self.template.origin}) did not finish rendering the "
                                       f"messages within {self.timeout:g} s (--chat-template-timeout)",
                                       param="messages")
                line = worker.stdout.readline()
                if not line:
                    raise ConnectionError(f"exited with {worker.wait()}")
                reply = json.loads(line)
            except (OSError, ValueError) as e:  # the worker died (a crash in C code, or close())
                if self._closed:
                    raise ServerShuttingDown("the server is shutting down; the chat template was stopped") from None
                log.error("a chat template worker failed: %s", e)
                raise RequestError(f"the chat template ({self.template.origin}) crashed rendering the messages",
                                   param="messages") from None
            finally:
                with self._lock:
                    if reply is not None and worker in self._workers:
                        self._idle.append(worker)
                    else:
                        self._workers.discard(worker)
                if reply is None:
                    _kill(worker)
            return reply

    def _take(self) -> subprocess.Popen:
        with self._lock:
            if self._closed:
                raise ServerShuttingDown("the server is shutting down; it renders no more chat templates")
            if self._idle:
                return self._idle.pop()
        worker = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        worker.stdin.write(self._setup)
        with self._lock:
            self._workers.add(worker)
        return worker


def _kill(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()
    for pipe in (worker.stdin, worker.stdout):
        try:
            pipe.close()
        except OSError:
            pass
