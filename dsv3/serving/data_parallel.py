"""Data-parallel attention in the engine (`-dp N`): one scheduler and block manager per DP group, all on rank 0.

Each DP group (tp ranks) runs attention for its own requests over its own latent cache; the MoE layers
span every rank (dsv3.parallel). Rank 0 hosts one LLMEngine per group: group 0's is the one whose model
runs here, the others' (`local=False`) only schedule, keep their group's block tables and sample. A new
request goes to the group with the least load (fewest unfinished requests, then most free blocks).

A step: every group's engine schedules; their plans go out in one message (each carrying every group's
token count, ForwardBatch.dp_num_tokens, so the MoE exchange agrees on its shapes); every rank runs its
group's plan (a group with nothing to do runs an empty one and still joins the exchange); each other
group's first rank sends its logits rows to rank 0 (gloo, CPU tensors), where each engine samples its own
sequences exactly as a one-process engine would (seeded requests carry their own generators).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from dsv3.errors import RequestError
from dsv3.serving.engine import EngineStats, LaunchedStep, LLMEngine
from dsv3.serving.outputs import RequestOutput
from dsv3.serving.workers import DataParallelStep, empty_plan, run_group_step


class DataParallelEngine:
    """The engines of every DP group behind the LLMEngine interface the engine loop drives.

    Args:
        engines: one per DP group; engines[0] runs its model here (its runner holds the channel), the others
            were built with local=False.
        tp: ranks per DP group (group g's first rank is g * tp).
    """

    def __init__(self, engines: list[LLMEngine], tp: int):
        self.engines, self.tp = engines, tp
        self.local = engines[0]
        self.runner = self.local.runner
        self.config, self.tokenizer = self.local.config, self.local.tokenizer
        self.generation_defaults = self.local.generation_defaults
        self._owner: dict[str, LLMEngine] = {}
        self.idle = True

    @property
    def max_model_len(self) -> int:
        return self.local.max_model_len

    @property
    def requests(self) -> dict:
        return {request_id: request for engine in self.engines for request_id, request in engine.requests.items()}

    def check_request_id(self, request_id, running=None) -> None:
        self.local.check_request_id(request_id, self._owner if running is None else running)

    def check_request(self, prompt_token_ids, params):
        return self.local.check_request(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params=None, arrival_time=None,
                    group: str = "") -> None:
        """Queue a request on the least loaded group (LLMEngine.add_request)."""
        if request_id in self._owner:
            raise RequestError(f"request {request_id!r} is already running", param="request_id")
        engine = min(self.engines, key=lambda e: (len(e.requests), -e.block_manager.num_free_blocks))
        engine.add_request(request_id, prompt_token_ids, params, arrival_time, group)
        self._owner[request_id] = engine

    def abort(self, request_id: str) -> RequestOutput | None:
        engine = self._owner.pop(request_id, None)
        return None if engine is None else engine.abort(request_id)

    def fail(self, request_id: str, error: BaseException) -> RequestOutput | None:
        engine = self._owner.pop(request_id, None)
        return None if engine is None else engine.fail(request_id, error)

    def has_unfinished_requests(self) -> bool:
        return any(engine.has_unfinished_requests() for engine in self.engines)

    def close(self) -> None:
        self.local.close()

    # ---- the step ----------------------------------------------------------------------------------

    def launch_step(self, before_eager: Callable[[], None] | None = None) -> list[LaunchedStep]:
        """Every group's step: scheduled, planned, sent to every rank in one message, run; the logits of
        the other groups come back to rank 0 before each engine launches its step with them."""
        if before_eager is not None:
            before_eager()
        steps = [engine.scheduler.schedule() for engine in self.engines]
        self.idle = all(step.is_empty for step in steps)
        plans = [engine.runner.plan(step)[2] if not step.is_empty else empty_plan()
                 for engine, step in zip(self.engines, steps, strict=True)]
        counts = tuple(plan.num_tokens for plan in plans)
        for plan in plans:
            plan.dp_num_tokens = counts
        channel = self.runner.channel
        with channel.lock:
            channel.send(DataParallelStep(plans))
            logits = [run_group_step(self.runner, DataParallelStep(plans), (0, 0), channel)]
            for group, plan in enumerate(plans[1:], 1):
                rows = torch.empty(len(plan.logits_rows), self.local.vocab_size, dtype=torch.float32)
                if plan.logits_rows:
                    dist.recv(rows, src=group * self.tp, group=channel.group)
                logits.append(rows.to(self.runner.device))
        launched = []
        for engine, step, group_logits in zip(self.engines, steps, logits, strict=True):
            engine.runner.precomputed = group_logits
            launched.append(engine.launch_step(scheduled=step))
        return launched

    def finish_step(self, launched: list[LaunchedStep]) -> list:
        return [(engine, request) for engine, step in zip(self.engines, launched, strict=True)
                for request in engine.finish_step(step)]

    def outputs(self, requests: list) -> list[RequestOutput]:
        outputs = []
        for engine, request in requests:
            outputs.append(engine.outputs([request])[0])
            if request.finished:
                self._owner.pop(request.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        each = [engine.stats() for engine in self.engines]
        return EngineStats(**{name: sum(getattr(s, name) for s in each) for name in (
            "num_running", "num_waiting", "prefix_queries", "prefix_hits", "num_preemptions", "prompt_tokens",
            "generation_tokens")}, cache_usage=sum(s.cache_usage for s in each) / len(each),
            num_blocks=each[0].num_blocks, block_size=each[0].block_size,
            used_blocks_per_rank=tuple(used for s in each for used in s.used_blocks_per_rank))
