"""`dsv3 bench serve`'s load: random-token requests, the two targets they go to, and how they are sent.

The dataset is vLLM's random one (random_requests): token ids drawn uniformly below the vocabulary size,
input and output lengths uniform within +-range_ratio of the asked ones, optionally behind a prefix shared
by every prompt. Requests are sent at most max_concurrency at a time, all at once or as a Poisson process
(run_load), each timed on the client side as its outputs stream in (RequestResult). A target is an
AsyncEngine in this process (EngineTarget) or an OpenAI-compatible server (HttpTarget); both report their
engine's counters (scrape: the engine's stats, or the server's Prometheus /metrics), which EngineWatch
reads before and after a run and samples for the peak cache usage in between.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dsv3.bench.common import error_line
from dsv3.errors import Dsv3Error

# ---- the requests ------------------------------------------------------------------------------

@dataclass
class BenchRequest:
    """One request: its prompt and how many tokens it must generate."""

    prompt_token_ids: list[int]
    output_len: int


def random_lengths(rng: np.random.Generator, count: int, length: int, range_ratio: float) -> list[int]:
    """`count` lengths drawn uniformly from [length * (1 - range_ratio), length * (1 + range_ratio)], >= 1."""
    low, high = max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=count).tolist()


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                    prefix_len: int = 0, seed: int = 0) -> list[BenchRequest]:
    """Requests of random token ids in [0, vocab_size): a prefix of `prefix_len` tokens shared by all, then
    `input_len` (+- range_ratio) tokens of each request's own."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab_size, size=prefix_len).tolist()
    inputs = random_lengths(rng, num_prompts, input_len, range_ratio)
    outputs = random_lengths(rng, num_prompts, output_len, range_ratio)
    return [BenchRequest(prefix + rng.integers(0, vocab_size, size=n).tolist(), m) for n, m in zip(inputs, outputs)]


def arrival_delays(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: all at 0 for an infinite rate, else a
    Poisson process (exponential gaps of mean 1 / request_rate)."""
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(seed)
    delays, now = [], 0.0
    for _ in range(count):
        delays.append(now)
        now += rng.expovariate(request_rate)
    return delays


# ---- one request's times -----------------------------------------------------------------------

@dataclass
class RequestResult:
    """What the client saw of one request (seconds, time.perf_counter)."""

    prompt_len: int
    output_len: int                      # asked
    output_tokens: int = 0               # received
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    cached_tokens: int | None = None     # prompt tokens served from the prefix cache, where the target says
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None


class _Stream:
    """Collects one request's arrival times as its outputs come in."""

    def __init__(self, result: RequestResult):
        self.result, self.start = result, time.perf_counter()
        self.last = self.start

    def tokens(self, total: int) -> None:
        """The request now has `total` output tokens (an output that brings none is no arrival)."""
        if total <= self.result.output_tokens:
            return
        now = time.perf_counter()
        if self.result.ttft is None:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self.last)
        self.last, self.result.output_tokens = now, total

    def done(self) -> RequestResult:
        self.result.latency = time.perf_counter() - self.start
        return self.result


# ---- the targets ---------------------------------------------------------------------------------

class EngineTarget:
    """An AsyncEngine (the engine asyncio callers use, as the server does) in this process."""

    sample_interval = 0.01

    def __init__(self, engine):
        self.engine = engine
        self.structured_outputs = None  # a grammar every request carries (bench serve --structured-output)

    def sampling_params(self, output_len: int):
        from dsv3.serving.params import SamplingParams

        return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                              structured_outputs=self.structured_outputs)

    async def send(self, request: BenchRequest, request_id: str) -> RequestResult:
        result = RequestResult(len(request.prompt_token_ids), request.output_len)
        stream = _Stream(result)
        try:
            async for output in self.engine.generate(request.prompt_token_ids,
                                                     self.sampling_params(request.output_len), request_id):
                stream.tokens(len(output.outputs[0].token_ids))
                result.cached_tokens = output.num_cached_tokens
                if output.finished and output.outputs[0].finish_reason not in ("length", "stop"):
                    result.error = f"finished with {output.outputs[0].finish_reason!r}"
        except Exception as e:  # noqa: BLE001 - a failed request is a result
            result.error = error_line(e)
        return stream.done()

    async def scrape(self) -> dict:
        s = self.engine.stats()
        values = {"num_running": s.num_running + s.num_waiting, "cache_usage": s.cache_usage,
                  "num_preemptions": s.num_preemptions, "prefix_queries": s.prefix_queries,
                  "prefix_hits": s.prefix_hits}
        spec = getattr(s, "spec_decode", None)
        if spec is not None:
            values.update(spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
                          spec_num_accepted_tokens=spec.num_accepted_tokens)
        return values


#: the engine's counters in a server's /metrics: dsv3's names and vLLM's (`dsv3:` or `vllm:` before them)
SERVER_METRICS = {"num_running": ("num_requests_running", "num_requests_waiting"),
                  "cache_usage": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
                  "num_preemptions": ("num_preemptions",),
                  "prefix_queries": ("prefix_cache_queries", "gpu_prefix_cache_queries"),
                  "prefix_hits": ("prefix_cache_hits", "gpu_prefix_cache_hits")}


def parse_metrics(text: str) -> dict:
    """The SERVER_METRICS found in Prometheus text, each summed over its labels (and over the names listed
    for it); a key is missing where the server exports none of its names."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        prefix, _, name = family.name.removesuffix("_total").partition(":")  # counters parse either way
        key = next((k for k, names in SERVER_METRICS.items() if name in names), None)
        if prefix not in ("dsv3", "vllm") or key is None:
            continue
        total = sum(s.value for s in family.samples if s.name in (family.name, family.name + "_total"))
        values[key] = values.get(key, 0.0) + total
    return values


class HttpTarget:
    """An OpenAI-compatible server, through streamed /v1/completions with token-id prompts; its engine's
    counters from /metrics where it exports them (dsv3's or vLLM's names)."""

    sample_interval = 0.25

    def __init__(self, url: str, model: str | None, api_key: str | None, max_connections: int):
        try:
            import httpx
        except ImportError:
            raise Dsv3Error("bench serve --url needs httpx: pip install httpx") from None
        root = url.rstrip("/").removesuffix("/v1")
        self.base, self.metrics_url = root + "/v1", root + "/metrics"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30.0),
                                        limits=httpx.Limits(max_connections=max_connections,
                                                            max_keepalive_connections=max_connections))
        self.model = model

    async def resolve_model(self) -> str:
        """--model, else the first model the server lists."""
        if self.model is None:
            try:
                response = await self.client.get(f"{self.base}/models")
            except Exception as e:  # noqa: BLE001
                raise Dsv3Error(f"bench serve: cannot reach {self.base}/models: {error_line(e)}") from None
            if response.status_code != 200:
                raise Dsv3Error(f"bench serve: {self.base}/models answered {response.status_code}: "
                                f"{response.text[:200]} (pass --model, or --api-key)")
            models = response.json().get("data") or []
            if not models:
                raise Dsv3Error(f"bench serve: {self.base}/models lists no model; pass --model")
            self.model = models[0]["id"]
        return self.model

    async def send(self, request: BenchRequest, request_id: str) -> RequestResult:
        result = RequestResult(len(request.prompt_token_ids), request.output_len)
        body = {"model": self.model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        stream = _Stream(result)
        chunks = 0
        try:
            async with self.client.stream("POST", f"{self.base}/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    result.error = f"HTTP {response.status_code}: {_error_message(text)}"
                    return stream.done()
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        result.error = f"stream error: {_error_message(json.dumps(chunk))}"
                    if chunk.get("choices"):  # one chunk per streamed piece, as vLLM's client counts them
                        chunks += 1
                        stream.tokens(chunks)
                    usage = chunk.get("usage")
                    if usage:
                        result.output_tokens = usage.get("completion_tokens", result.output_tokens)
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            result.cached_tokens = details["cached_tokens"]
        except Exception as e:  # noqa: BLE001 - a failed request is a result
            result.error = error_line(e)
        return stream.done()

    async def scrape(self) -> dict:
        """The server's engine counters (parse_metrics), {} where /metrics is missing or unreadable."""
        try:
            response = await self.client.get(self.metrics_url)
            return parse_metrics(response.text) if response.status_code == 200 else {}
        except Exception:  # noqa: BLE001 - a server without Prometheus metrics is benchmarked all the same
            return {}

    async def close(self) -> None:
        await self.client.aclose()


def _error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message)[:200]
    except (ValueError, AttributeError):
        return text[:200]


# ---- the load ------------------------------------------------------------------------------------

class EngineWatch:
    """The target's engine counters (its `scrape()`) before and after a run, and the peak cache usage in
    between, sampled every `target.sample_interval` seconds."""

    def __init__(self, target):
        self.target = target
        self.peak_cache_usage: float | None = None

    async def settled(self, timeout: float = 10.0) -> dict:
        """The counters once no request runs or waits (the engine's snapshot follows its last outputs)."""
        deadline = time.perf_counter() + timeout
        values = await self.target.scrape()
        while values.get("num_running") and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
            values = await self.target.scrape()
        return values

    async def sample(self) -> None:
        """Track the peak cache usage until cancelled."""
        while True:
            usage = (await self.target.scrape()).get("cache_usage")
            if usage is not None:
                self.peak_cache_usage = max(self.peak_cache_usage or 0.0, usage)
            await asyncio.sleep(self.target.sample_interval)


async def run_load(target, requests: Sequence[BenchRequest], max_concurrency: int, request_rate: float = math.inf,
                   seed: int = 0, tag: str = "bench") -> tuple[list[RequestResult], float]:
    """Send `requests` to `target`, at most `max_concurrency` in flight; (results in order, seconds from
    the first request sent to the last one done)."""
    gate = asyncio.Semaphore(max_concurrency)
    delays = arrival_delays(len(requests), request_rate, seed)
    start = time.perf_counter()

    async def one(i: int, request: BenchRequest) -> RequestResult:
        wait = start + delays[i] - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        async with gate:
            return await target.send(request, f"{tag}-{i}")

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return list(results), time.perf_counter() - start
