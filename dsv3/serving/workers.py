"""Several ranks under one serving engine: rank 0 schedules and samples, every rank runs each step.

`dsv3 serve -tp 2` (or `load_model(..., tensor_parallel_size=2)`) on one node: this process becomes rank 0
and starts ranks 1..N-1 itself (`python -m dsv3.serving.worker`, rendezvous on a free port of this
machine). Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) the launcher starts them instead. Every rank
loads its part of the model (dsv3.parallel) with the same arguments; then rank 0 runs the engine (the
HTTP server, scheduler, block manager and sampler all live there) and, before each forward, broadcasts
the step's plan (model_runner.StepPlan: tokens, positions, block tables, logits rows) over a gloo group
of CPU processes, so the control channel never waits on an accelerator. The other ranks run
`serve_steps`: receive a plan, run the same forward (joining its collectives), until rank 0 says stop.

Faults: rank 0 watches the processes it started. One that dies or raises (it writes why to a pipe before
exiting) is reported with its rank and reason to `on_failure`, which fails the in-flight requests and
stops the server; gloo's own timeouts are far too long to wait for. Each worker watches its parent and
exits when it is gone, so no rank outlives rank 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from dsv3.errors import Dsv3Error
from dsv3.serving.model_runner import ModelRunner, StepPlan

log = logging.getLogger(__name__)

#: the control group's timeout: an idle server's workers wait on it for as long as the server runs
CONTROL_TIMEOUT = timedelta(days=365)
#: how often rank 0 checks its workers, and a worker its parent
POLL_SECONDS = 0.2
#: the environment variable naming the pipe a worker writes its failure to
STATUS_FD = "DSV3_WORKER_STATUS_FD"


class RankFailure(Dsv3Error):
    """A rank died or raised: the ranks can no longer run steps together, so the engine stops."""


@dataclass(frozen=True)
class LogitsCall:
    """Model.logits over several ranks: every rank runs the whole-sequence forward of `tokens` [B, T]."""

    tokens: torch.Tensor


class StepChannel:
    """Rank 0's messages to every other rank (step plans, LogitsCall, None to stop), over a gloo group.

    Every rank must create it at the same point (a new process group). `lock` is held by whoever sends a
    message and runs the forward it starts, so two threads of rank 0 never interleave collectives.

    Args:
        ranks: on rank 0, the worker processes it started (None under torchrun and on other ranks).
    """

    def __init__(self, ranks: LocalRanks | None = None):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.lock = threading.Lock()
        self.ranks = ranks
        self.broken = False  # a rank failed: nothing more is sent
        self.closed = dist.get_rank() != 0  # only rank 0 sends, and stops the others

    def wait_for_news(self, seconds: float = 1.0) -> None:
        """After a failed step: give the watcher of the workers a moment to report one that died (its rank and
        reason say more than the collective that broke)."""
        deadline = time.monotonic() + seconds
        while self.ranks is not None and not self.broken and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 4)

    def close(self) -> None:
        """On rank 0: tell every rank to stop and wait for the workers it started to end."""
        if self.closed:
            return
        self.closed = True
        if self.ranks is not None:
            self.ranks.expect_exit()
        if not self.broken:
            with self.lock:
                self.send(None)
        if self.ranks is not None:
            self.ranks.stop()

    def send(self, message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


@dataclass
class DataParallelStep:
    """What rank 0 sends for one step under DP attention: plans[g] is DP group g's plan."""

    plans: list[StepPlan]


def empty_plan() -> StepPlan:
    return StepPlan([], [], [], 0, [])


def run_group_step(runner: ModelRunner, message: DataParallelStep, plan_of_rank, channel) -> torch.Tensor:
    """On any rank: run this rank's group's plan; a group's first rank (not group 0's) then sends its logits to
    rank 0. Returns the logits."""
    dp_rank, tp_rank = plan_of_rank
    plan = message.plans[dp_rank]
    logits = runner.execute(plan)
    if dp_rank > 0 and tp_rank == 0 and plan.logits_rows:
        dist.send(logits.float().cpu().contiguous(), dst=0, group=channel.group)
    return logits


def serve_steps(model) -> None:
    """On a rank other than 0: run every step rank 0 sends until it sends None (Model.shutdown)."""
    runner = model.engine.runner
    channel = runner.channel
    while True:
        message = channel.receive()
        if message is None:
            return
        if isinstance(message, LogitsCall):
            model.transformer.logits(message.tokens)
        elif isinstance(message, DataParallelStep):
            plan = model.transformer.plan
            run_group_step(runner, message, (plan.dp_rank, plan.tp_rank), channel)
        else:
            runner.execute(message)


# ---- the worker processes of this node ------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalRanks:
    """The worker processes this process started, watched by a thread.

    Args:
        world_size: ranks in the job.
        settings: rank 0's EngineArgs; every worker builds the model with them.
        first_rank: this process's rank (0 on the first node); it starts the next num_local - 1.
        num_local: ranks on this node, this process included.
        master_addr, master_port: the rendezvous (rank 0's node; a free local port by default).
    """

    def __init__(self, world_size: int, settings, first_rank: int = 0, num_local: int | None = None,
                 master_addr: str = "127.0.0.1", master_port: int | None = None):
        num_local = world_size if num_local is None else num_local
        port = master_port or free_port()
        job = dict(MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
        # this process joins as torchrun's ranks do, from the environment; stop() puts it back
        self._saved_env = {k: os.environ.get(k) for k in (*job, "RANK", "LOCAL_RANK")}
        os.environ.update(job, RANK=str(first_rank), LOCAL_RANK="0")
        threads = max(1, (os.cpu_count() or 1) // num_local)  # the node's cores shared, not oversubscribed
        torch.set_num_threads(threads)
        #: called in the watching thread with "rank R (pid P) ..." when a worker ends unasked
        self.on_failure: Callable[[str], None] = self._fail_while_loading
        self.processes: dict[int, subprocess.Popen] = {}
        self._status: dict[int, int] = {}
        self._stopping = False
        payload = pickle.dumps(settings)
        for local in range(1, num_local):
            rank = first_rank + local
            read, write = os.pipe()
            env = {**os.environ, **job, "RANK": str(rank), "LOCAL_RANK": str(local), STATUS_FD: str(write),
                   "OMP_NUM_THREADS": str(threads)}
            process = subprocess.Popen([sys.executable, "-m", "dsv3.serving.worker"], stdin=subprocess.PIPE,
                                       env=env, pass_fds=(write,))
            os.close(write)
            os.set_blocking(read, False)
            self.processes[rank], self._status[rank] = process, read
            process.stdin.write(payload)
            process.stdin.close()
        atexit.register(self.stop)
        threading.Thread(target=self._watch, name="dsv3-rank-watch", daemon=True).start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.processes.items()}

    def describe(self) -> str:
        return "started ranks " + ", ".join(f"{rank} (pid {pid})" for rank, pid in self.pids.items())

    def expect_exit(self) -> None:
        """The workers are about to be told to stop: their ending is no failure."""
        self._stopping = True

    def _watch(self) -> None:
        while not self._stopping:
            for rank, process in self.processes.items():
                code = process.poll()  # 0: told to stop by rank 0 (another node's process may be rank 0)
                if code not in (None, 0) and not self._stopping:
                    self.on_failure(f"rank {rank} (pid {process.pid}) {self._reason(rank, code)}")
                    return
            time.sleep(POLL_SECONDS)

    def _fail_while_loading(self, message: str) -> None:
        """A rank failed before the engine served anything. Where every rank refuses the same layout, rank
        0 raises that error itself (and stops the workers): give it a moment. Otherwise its main thread may
        wait in a collective with the dead rank for as long as gloo allows: say why and end the process."""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not self._stopping:
            time.sleep(POLL_SECONDS)
        if not self._stopping:
            print(f"dsv3: error: {message}; stopping every rank", file=sys.stderr, flush=True)
            self.kill()
            os._exit(1)

    def _reason(self, rank: int, code: int) -> str:
        try:
            said = os.read(self._status[rank], 1 << 16).decode(errors="replace").strip()
        except OSError:
            said = ""
        if said:
            return f"failed: {said}"
        if code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to end (after rank 0 told them to stop), killing what is left after `timeout`;
        then leave the process group, so this process can load another model."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def kill(self) -> None:
        """End every worker still running now (they may be stuck in a collective with a dead rank)."""
        self._stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait()
        for read in self._status.values():
            try:
                os.close(read)
            except OSError:
                pass
        self._status = {}

