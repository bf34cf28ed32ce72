"""What the engine hands back per request: cumulative outputs, once per step that brought news."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Times (time.monotonic) of the request's arrival, its first and its latest generated token."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class CompletionOutput:
    """One completion of a request (n of them when n > 1); everything cumulative.

    Attributes:
        index: which completion.
        text: the text so far (held back while it may be the start of a stop string; ends before the stop).
        token_ids: the generated tokens so far (a stop token id included).
        logprobs: per generated token {token_id: logprob}: the top `logprobs` and the sampled token.
        finish_reason: "stop", "length", "abort", or None while running.
        stop_reason: the stop string or stop token id that ended it (None for EOS or length).
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    Attributes:
        request_id: the caller's id.
        prompt_token_ids: the prompt.
        outputs: its completions, by index.
        finished: all completions are done.
        num_cached_tokens: prompt tokens served from the prefix cache.
        metrics: arrival, first and latest token times.
        error: why the engine failed this request (the request then ends; AsyncEngine raises it).
        prompt_logprobs: with SamplingParams.prompt_logprobs, per prompt token ({token: logprob}, the prompt
            token's rank), None for the first token; complete once the prefill is done.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    error: str | None = None
    prompt_logprobs: list[tuple[dict[int, float], int] | None] | None = None
