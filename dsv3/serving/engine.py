"""LLMEngine: requests in, one step at a time, outputs out (not thread-safe; AsyncEngine drives it).

A step: the scheduler picks who runs, the model runner runs them, the sampler picks each finished
sequence's next token, the detokenizer extends its text and checks stop strings, and finished
sequences free their blocks. A failure inside a step fails only the request it belongs to: when the
batched forward or the batched sampler raises, each sequence is run again on its own and only those
that still raise fail; their blocks are freed and the loop goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Container

import torch

from dsv3.errors import RequestError
from dsv3.model import Transformer
from dsv3.serving.block_manager import BlockManager
from dsv3.serving.detokenizer import IncrementalDetokenizer
from dsv3.serving.model_runner import ModelRunner
from dsv3.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput
from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence
from dsv3.serving.sampler import Sampler, SamplerOutput, prompt_logprobs
from dsv3.serving.scheduler import ScheduledStep, Scheduler
from dsv3.serving.spec_decode import MTPProposer, SpecDecodeStats, SpeculativeConfig
from dsv3.serving.structured import StructuredOutputs, apply_token_bitmask
from dsv3.serving.workers import RankFailure


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (from EngineArgs, dsv3.engine_args).

    Attributes:
        max_model_len: the longest sequence, prompt and output.
        block_size: tokens per cache block.
        kv_cache_dtype: the latent cache's type (auto, bf16 or fp8), which the pools are allocated with.
        num_blocks: blocks per layer pool, the scratch block included (from cache_sizing).
        max_num_seqs: sequences running at once.
        max_num_batched_tokens: tokens per step.
        enable_prefix_caching: reuse cached blocks of equal prompt prefixes.
        enforce_eager: never replay recorded decode steps.
        seed: seed of the generator unseeded requests share.
        speculative_config: MTP speculative decoding (None: off).
    """

    max_model_len: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    kv_cache_dtype: str = "auto"
    speculative_config: SpeculativeConfig | None = None


@dataclass
class EngineStats:
    """Gauges (num_running, num_waiting requests; cache_usage 0..1) and counters since the start."""

    num_running: int
    num_waiting: int
    cache_usage: float
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_blocks: int = 0
    block_size: int = 0
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding
    used_blocks_per_rank: tuple[int, ...] = ()  # blocks held by sequences, per DP group (one without DP)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    error: str | None = None
    finished: bool = False

    @property
    def done(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class LaunchedStep:
    """A step between launch_step and finish_step: what runs, who samples, their logits (still being
    computed on an accelerator) and the requests already changed (failed) while launching."""

    step: ScheduledStep
    seqs: list[Sequence]
    logits: torch.Tensor | None
    changed: dict[str, _Request]
    bitmask: torch.Tensor | None = None  # the structured-output rows' allowed tokens, a row per sequence
    prompt_logits: list = field(default_factory=list)  # ModelRunner.prompt_logits of this step


class LLMEngine:
    """The engine over one model.

    Args:
        model: the model; its cache is allocated here to config.num_blocks blocks.
        config: settings.
        tokenizer: a `tokenizers.Tokenizer` for text and stop strings, or None (token ids only).
        eos_token_ids: tokens that end a completion unless ignore_eos.
        generation_defaults: sampling defaults of the checkpoint (params.generation_defaults).
        channel: over several ranks, where each step's plan goes to the other ranks (workers.StepChannel);
            set on every rank, since they record the same steps.
        local: False for the engine of another DP group hosted on rank 0 (data_parallel): it schedules and
            samples, its group's ranks hold its cache and run its steps.
    """

    def __init__(self, model: Transformer, config: EngineConfig, tokenizer=None, eos_token_ids=(),
                 generation_defaults: dict | None = None, channel=None, local: bool = True):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.generation_defaults = dict(generation_defaults or {})
        model.allocate_cache(config.num_blocks, config.block_size, config.kv_cache_dtype)
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        spec = config.speculative_config
        self.runner = ModelRunner(model, config.block_size, config.max_num_seqs, config.max_model_len,
                                  config.enforce_eager, rows_per_seq=1 + (spec.num_speculative_tokens if spec else 0),
                                  keep_hidden=spec is not None)
        self.runner.channel = channel
        if local:
            self.runner.record_all()
        else:
            self.runner.graphs = False
        self.sampler = Sampler(model.backend.device, config.seed)
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, self.eos_token_ids)
        self.proposer = None if spec is None else MTPProposer(
            model, spec, config.num_blocks, config.block_size, config.max_num_seqs, config.max_model_len, self.sampler,
            rows_as_decode=self.runner.graphs, buckets=self.runner.buckets)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens = self.generation_tokens = 0
        self.idle = True

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    # ---- requests ---------------------------------------------------------------------------------

    def check_request_id(self, request_id, running: Container[str] | None = None) -> None:
        """RequestError unless `request_id` is a non-empty string not in `running` (default: this engine's
        requests; the engine loop passes the requests it has in flight)."""
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}", param="request_id")
        if request_id in (self.requests if running is None else running):
            raise RequestError(f"request {request_id!r} is already running", param="request_id")

    def check_request(self, prompt_token_ids, params: SamplingParams | None) -> SamplingParams:
        """Validate a request without touching the engine (safe from any thread); returns the resolved params.
        The one place a request is checked: the engine loop, the Python API and the HTTP server ask it.

        Raises:
            RequestError naming the field: bad params, an empty prompt, ids outside the vocabulary, a prompt
            that leaves no room in the context, or max_tokens beyond it.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}",
                               param="sampling_params")
        params.validate()
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise RequestError("the prompt must be a non-empty list of token ids", param="prompt")
        for token in prompt_token_ids:
            if isinstance(token, bool) or not isinstance(token, int):
                raise RequestError(f"prompt token ids must be integers, got {token!r}", param="prompt")
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"prompt token id {token} is outside the vocabulary [0, {self.vocab_size})",
                                   param="prompt")
        n, limit = len(prompt_token_ids), self.max_model_len
        if n >= limit:
            raise RequestError(f"the prompt is {n} tokens, and this model's context is {limit} tokens: shorten the "
                               f"prompt", param="prompt")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise RequestError(f"this model's context is {limit} tokens, but {n + params.max_tokens} were requested "
                               f"({n} in the prompt, {params.max_tokens} to generate): lower max_tokens to at most "
                               f"{limit - n}", param="max_tokens")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (this model has none; use stop_token_ids)",
                               param="stop")
        for token in params.stop_token_ids or ():
            if token >= self.vocab_size:
                raise RequestError(f"stop token id {token} is outside the vocabulary [0, {self.vocab_size})",
                                   param="stop_token_ids")
        resolved = params.resolved(self.generation_defaults)
        if resolved.structured_outputs is not None and resolved._grammar is None:
            resolved._grammar = self.structured.compile(resolved.structured_outputs)
        return resolved

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, group: str = "") -> None:
        """Queue a request (RequestError for a bad one, nothing queued). Requests of one `group` (the prompts
        of one HTTP request) share the scheduler's slots as one request."""
        self.check_request_id(request_id)
        params = self.check_request(prompt_token_ids, params)
        prompt = list(prompt_token_ids)
        seqs, detokenizers = [], []
        for index in range(params.n):
            seq = Sequence(request_id if params.n == 1 else f"{request_id}#{index}", request_id, index, list(prompt),
                           len(prompt), params, self.max_model_len, leader=None if index == 0 else seqs[0],
                           logprobs=[] if params.logprobs is not None else None, group=group)
            if params.prompt_logprobs is not None and index == 0:
                seq.prompt_logprobs = [None]  # the first prompt token has none
            if params._grammar is not None:
                seq.grammar = self.structured.matcher(params._grammar, params.structured_outputs.reasoning_end)
            if params.seed is not None:
                seed = params.seed if index == 0 else hash((params.seed, index)) & (2**63 - 1)
                seq.generator = torch.Generator(self.model.backend.device).manual_seed(seed)
            seqs.append(seq)
            detokenizers.append(None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt, params.skip_special_tokens, params.stop))
        request = _Request(request_id, prompt, params, seqs, detokenizers,
                           RequestMetrics(time.monotonic() if arrival_time is None else arrival_time))
        self.requests[request_id] = request
        self.prompt_tokens += len(prompt)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now, freeing its blocks; its final output (finish_reason "abort"), or None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.finished = True
        return self._output(request)

    def fail(self, request_id: str, error: BaseException) -> RequestOutput | None:
        """End a request now with `error` (its blocks freed); its final output, carrying the error, or None
        if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._fail(request, error)
        return self.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def close(self) -> None:
        """Over several ranks, on rank 0: stop every other rank (no step runs after this)."""
        if self.runner.channel is not None:
            self.runner.channel.close()

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of every request that changed (finished ones for the last time)."""
        return self.outputs(self.finish_step(self.launch_step()))

    def launch_step(self, before_eager: Callable[[], None] | None = None,
                    scheduled: ScheduledStep | None = None) -> "LaunchedStep":
        """The first part of a step: schedule it and start its forward. A replayed decode step runs on
        the device after this returns (nothing waits for it before finish_step reads the logits), so the
        caller can do other host work meanwhile (`outputs` of the previous step); no add or abort before
        finish_step. `before_eager` is called first where the step runs eagerly instead (its forward may
        keep the host busy for all of its length: work left for later would wait as long). `scheduled`: the
        step where the scheduler chose it already (data_parallel)."""
        step = self.scheduler.schedule() if scheduled is None else scheduled
        self.idle = step.is_empty  # nothing could run (the loop then waits rather than spins)
        launched = LaunchedStep(step, [], None, {})
        if not step.is_empty:
            if before_eager is not None and not self.runner.replays(step):
                before_eager()
            launched.step, launched.seqs, launched.logits = self._run(step, launched.changed)
            launched.prompt_logits = self.runner.prompt_logits
            # filled on the host while a replayed step still runs on the device
            launched.bitmask = self.structured.bitmask([seq.grammar for seq in launched.seqs])
        return launched

    def finish_step(self, launched: "LaunchedStep") -> list["_Request"]:
        """The second part: sample, append each sequence's token and decide whether it ends (finished
        requests leave the engine here). Returns the requests that changed; `outputs` makes their
        outputs, detokenizing what needs no stop string check, and may run after the next launch_step."""
        step, seqs, changed = launched.step, launched.seqs, launched.changed
        if not step.is_empty:
            spans = [(seq, seq.num_computed_tokens, count) for seq, count in step.scheduled()]
            self._record_prompt_logprobs(launched.prompt_logits)
            self.scheduler.update(step)
            logits = launched.logits
            if launched.bitmask is not None:
                logits = self._constrain(logits, seqs, launched.bitmask)
            sampled = self._sample(logits, seqs, changed)
            now = time.monotonic()
            for seq, tokens, logprobs in sampled:
                request = self.requests.get(seq.request_id)
                if request is None or seq.is_finished:
                    continue
                try:  # accepted draft tokens one by one: each may stop the sequence
                    for token, token_logprobs in zip(tokens, logprobs, strict=True):
                        self._append(request, seq, token, token_logprobs, now)
                        if seq.is_finished:
                            break
                    if seq.draft_token_ids and not seq.is_finished:
                        self.scheduler.accepted(seq)
                except Exception as e:  # noqa: BLE001 - e.g. the detokenizer: only this request fails
                    self._fail(request, e)
                changed[request.request_id] = request
            if self.proposer is not None:
                self._propose(spans)
                for seq in seqs:
                    if seq.grammar is not None:
                        seq.drop_drafts()  # a draft the grammar has not vetted would need a matcher rollback
        for request in changed.values():
            self._retire_if_done(request)
        return list(changed.values())

    def outputs(self, requests: list["_Request"]) -> list[RequestOutput]:
        """The outputs of requests finish_step returned (cumulative: built now, they say the same as then,
        as long as no step finished in between)."""
        return [self._output(request) for request in requests]

    def _retire_if_done(self, request: "_Request") -> None:
        if request.done and not request.finished:
            request.finished = True
            self.requests.pop(request.request_id, None)

    def _run(self, step: ScheduledStep, changed: dict) -> tuple[ScheduledStep, list[Sequence], torch.Tensor]:
        """The forward; where it raises, each sequence alone, failing the requests that still raise. Over
        several ranks a forward that raises leaves the ranks out of step: RankFailure, the engine stops."""
        try:
            seqs, logits = self.runner.run(step)
            return step, seqs, logits
        except Exception as error:  # noqa: BLE001
            if self.runner.channel is not None:
                self.runner.channel.wait_for_news()  # a worker that died broke the step: say which
                raise RankFailure(f"rank 0 failed in a step: {type(error).__name__}: {error}") from error
            first_error = error
        kept, seqs, parts, prompt_logits = ScheduledStep(), [], [], []
        for seq, count in step.scheduled():
            if seq.is_finished:
                continue
            alone = ScheduledStep(decodes=[seq]) if count == 1 else ScheduledStep(prefills=[(seq, count)])
            try:
                got, logits = self.runner.run(alone)
                prompt_logits += self.runner.prompt_logits
            except Exception as e:  # noqa: BLE001
                request = self.requests[seq.request_id]
                self._fail(request, e if len(step.scheduled()) > 1 else first_error)
                changed[request.request_id] = request
                continue
            (kept.decodes.append(seq) if count == 1 else kept.prefills.append((seq, count)))
            seqs += got
            parts.append(logits)
        live = [i for i, s in enumerate(seqs) if not s.is_finished]  # a failed sibling ended its request
        rows, row = [], 0  # a sequence verifying drafts has a logits row per verified position
        for s in seqs:
            count = 1 + len(s.draft_token_ids)
            if not s.is_finished:
                rows += range(row, row + count)
            row += count
        logits = torch.cat(parts)[rows] if parts else torch.empty(0)
        self.runner.hidden = None  # rows of separate runs: no drafts this step
        kept.decodes = [s for s in kept.decodes if not s.is_finished]
        kept.prefills = [(s, n) for s, n in kept.prefills if not s.is_finished]
        self.runner.prompt_logits = prompt_logits
        return kept, [seqs[i] for i in live], logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], changed: dict):
        """(seq, tokens, logprobs) per sequence: its next token, or where it verifies draft tokens those it
        accepts and the target's next; the sampler isolated per sequence where it raises."""
        if not seqs:
            return []
        try:
            return self._sample_batch(logits, seqs)
        except Exception:  # noqa: BLE001
            pass
        result, row = [], 0
        for seq in seqs:
            count = 1 + len(seq.draft_token_ids)
            row += count
            try:
                result += self._sample_batch(logits[row - count:row], [seq])
            except Exception as e:  # noqa: BLE001
                request = self.requests.get(seq.request_id)
                if request is not None:
                    self._fail(request, e)
                    changed[request.request_id] = request
        return result

    @staticmethod
    def _record_prompt_logprobs(prompt_logits: list) -> None:
        """Each prompt chunk's log-probabilities onto its sequence (positions not recorded yet: a preempted
        sequence recomputes its prompt)."""
        for seq, start, logits in prompt_logits:
            if seq.is_finished:
                continue
            first = len(seq.prompt_logprobs) - 1 - start  # rows already recorded
            if first < 0 or first >= logits.shape[0]:
                continue
            targets = seq.token_ids[start + 1 + first:start + 1 + logits.shape[0]]
            seq.prompt_logprobs += prompt_logprobs(logits[first:], targets, seq.params.prompt_logprobs)

    @staticmethod
    def _constrain(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor) -> torch.Tensor:
        """The logits with structured output's bitmask applied (a row per sequence in `bitmask`; the
        logits have 1 + len(draft_token_ids) rows per sequence, constrained sequences one)."""
        rows, masks, row = [], [], 0
        for i, seq in enumerate(seqs):
            if seq.grammar is not None:
                rows.append(row)
                masks.append(i)
            row += 1 + len(seq.draft_token_ids)
        if row == len(seqs):  # no drafts: the rows are the sequences
            return apply_token_bitmask(logits, bitmask)
        index = torch.tensor(rows, device=logits.device)
        return logits.index_copy(0, index, apply_token_bitmask(logits[index], bitmask[masks]))

    def _sample_batch(self, logits: torch.Tensor, seqs: list[Sequence]):
        if self.proposer is not None and any(s.draft_token_ids for s in seqs):
            return self.proposer.sample(logits, seqs)
        out: SamplerOutput = self.sampler(logits, seqs)
        return [(seq, [token], [logprobs]) for seq, token, logprobs in zip(seqs, out.tokens, out.logprobs, strict=True)]

    def _propose(self, spans: list[tuple[Sequence, int, int]]) -> None:
        """The MTP module over the positions this step computed, drafting for the next (see spec_decode)."""
        hidden = self.runner.hidden
        if hidden is None:
            return
        known, row = [], 0
        for seq, start, count in spans:
            if not seq.is_finished:  # positions computed, with their next token known
                known.append((seq, row, start, seq.num_computed_tokens - start))
            row += count
        self.proposer.propose(known, hidden, self.proposer.enabled(len(self.scheduler.running)))

    def _append(self, request: _Request, seq: Sequence, token: int, logprobs, now: float) -> None:
        seq.token_ids.append(token)
        self.generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs or {})
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now
        detokenizer = request.detokenizers[seq.index]
        # text is needed now only to look for stop strings; otherwise `_output` catches up later
        stop_string = self._detokenize(seq, detokenizer) if detokenizer is not None and detokenizer.stop else None
        params = seq.params
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise RequestError(f"structured output: the grammar refused the sampled token {token}")
        if stop_string is not None:
            self.scheduler.finish(seq, "stop", stop_string)
        elif token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop", token)
        elif (not params.ignore_eos and token in self.eos_token_ids) or (seq.grammar and seq.grammar.terminated):
            self.scheduler.finish(seq, "stop")
        elif seq.num_output_tokens >= seq.max_tokens:
            self.scheduler.finish(seq, "length")

    def _fail(self, request: _Request, error: BaseException) -> None:
        """End every sequence of the request now (blocks freed); the error goes out with its output."""
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        request.error = f"request {request.request_id} failed: {type(error).__name__}: {message}"
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    @staticmethod
    def _detokenize(seq: Sequence, detokenizer: IncrementalDetokenizer) -> str | None:
        """Feed the detokenizer seq's output tokens it has not seen; the stop string one completed, if any."""
        first = seq.num_prompt_tokens + detokenizer.num_tokens
        for token in seq.token_ids[first:]:
            stop_string = detokenizer.add(token)
            if stop_string is not None:
                return stop_string
        return None

    def _output(self, request: _Request) -> RequestOutput:
        for seq, detokenizer in zip(request.seqs, request.detokenizers, strict=True):
            if detokenizer is not None and not detokenizer.stop:
                try:
                    self._detokenize(seq, detokenizer)
                except Exception as e:  # noqa: BLE001 - only this request fails
                    self._fail(request, e)
                    self._retire_if_done(request)
        completions = []
        for seq, detokenizer in zip(request.seqs, request.detokenizers, strict=True):
            text = detokenizer.visible_text(seq.is_finished) if detokenizer is not None else ""
            completions.append(CompletionOutput(seq.index, text, seq.token_ids[seq.num_prompt_tokens:],
                                                None if seq.logprobs is None else list(seq.logprobs),
                                                seq.finish_reason, seq.stop_reason))
        cached = request.seqs[0].num_cached_tokens or 0
        m = request.metrics
        prompt_logprobs = request.seqs[0].prompt_logprobs
        return RequestOutput(request.request_id, request.prompt_token_ids, completions, request.finished,
                             cached, RequestMetrics(m.arrival_time, m.first_token_time, m.last_token_time),
                             request.error, None if prompt_logprobs is None else list(prompt_logprobs))

    # ---- stats -----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        running = {seq.request_id for seq in list(s.running)}  # copies: safe to call from another thread
        waiting = {seq.request_id for seq in list(s.waiting)} - running
        return EngineStats(num_running=len(running), num_waiting=len(waiting), cache_usage=bm.usage,
                           prefix_queries=bm.prefix_queries, prefix_hits=bm.prefix_hits,
                           num_preemptions=s.num_preemptions, prompt_tokens=self.prompt_tokens,
                           generation_tokens=self.generation_tokens, num_blocks=self.config.num_blocks,
                           block_size=self.config.block_size,
                           used_blocks_per_rank=(bm.num_usable_blocks - bm.num_free_blocks,),
                           spec_decode=None if self.proposer is None else self.proposer.stats.copy())

