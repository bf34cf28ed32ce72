"""Starting a real `dsv3 serve` process on the tiny checkpoint on a free port, for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"
MAX_REQUEST_BYTES = 256 * 1024
MAX_MODEL_LEN = 512
#: the start-up target: the first 200 on /health within this on a CPU
STARTUP_LIMIT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m dsv3 serve` in a subprocess; `url` once /health answers 200."""

    def __init__(self, *flags: str, api_key_env: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # the server's output, for failure messages
        extra_env = env or {}
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("DSV3_API_KEY", None)
        env.pop("VLLM_API_KEY", None)
        if api_key_env is not None:
            env["DSV3_API_KEY"] = api_key_env
        env.update(extra_env)
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dsv3", "serve", "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN),
             "--max-num-seqs", "16", "--cache-tokens", "8192", *flags],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        while time.monotonic() - started < 120:
            if self.process.poll() is not None:
                raise RuntimeError(f"dsv3 serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"dsv3 serve did not answer /health within 120 s:\n{self.output()}")
        self.startup_s = time.monotonic() - started

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


class HealthPoller:
    """Polls /health from a thread while a `with` block runs; `failures` lists the polls not answered 200
    within a second (the server's event loop must keep answering whatever a request does)."""

    def __init__(self, url: str):
        self.url, self.failures, self.polls = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=1.0) as client:
            while not self._stop.is_set():
                try:
                    status = client.get(f"{self.url}/health").status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}")
                self.polls += 1
                self._stop.wait(0.1)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
