"""`dsv3 bench serve`: requests of random tokens through the serving engine, in this process or over HTTP.

N requests (`--num-prompts`) of random token ids, `--input-len` and `--output-len` long each within
+-`--range-ratio` (vLLM's random dataset), optionally behind a shared `--prefix-len` prefix, are sent at
most `--max-concurrency` at a time, arriving all at once or as a Poisson process of `--request-rate`
requests per second. Every request asks for exactly its output length (greedy, ignore_eos).

Two targets:
- in-process: an AsyncEngine built from the engine flags (dsv3.serving.args), on a checkpoint (`--ckpt`) or
  on synthetic weights at DeepSeek-V3's dimensions (`--config deepseek-v3 --layers N`, like `bench decode`);
- `--url URL`: any OpenAI-compatible server (`dsv3 serve`, `vllm serve`, ...), through streamed
  /v1/completions requests with token-id prompts.

Times are taken here, on the client side, for both targets: TTFT (request sent to first token), ITL (the
gaps between a request's streamed outputs), TPOT ((latency - TTFT) / (tokens - 1) per request), E2EL. The
in-process target also reports the engine's peak cache usage, preemptions and prefix-cache hits, and
(`--static-decode-baseline`, the default on an accelerator) the static batch decode step of `bench
decode` at batch = the concurrency and the run's mean context (prefix + input + output / 2), timed on the
engine's own model and cache pool once the run is over: the engine's output tokens/s over the static
step's is the "vs static" ratio (issue 19's target: at least 0.9).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dsv3.errors import Dsv3Error, UsageError

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


def _error(e: BaseException) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}"


# ---- the targets ---------------------------------------------------------------------------------

class EngineTarget:
    """An AsyncEngine (Contract B) in this process."""

    sample_interval = 0.01

    def __init__(self, engine):
        self.engine = engine

    def sampling_params(self, output_len: int):
        from dsv3.serving.params import SamplingParams

        return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

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
            result.error = _error(e)
        return stream.done()

    async def scrape(self) -> dict:
        s = self.engine.stats()
        return {"num_running": s.num_running + s.num_waiting, "cache_usage": s.cache_usage,
                "num_preemptions": s.num_preemptions, "prefix_queries": s.prefix_queries,
                "prefix_hits": s.prefix_hits}


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
                raise Dsv3Error(f"bench serve: cannot reach {self.base}/models: {_error(e)}") from None
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
            result.error = _error(e)
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


# ---- the summary ---------------------------------------------------------------------------------

@dataclass
class ServeRecord:
    """One load run (vLLM `bench serve`'s JSON names where it has them; times in ms).

    Attributes:
        what: "serve".
        impl: who served it: "dsv3 engine in-process (<backend>)" or the URL and model.
        target: "in-process" or the URL.
        num_prompts, completed, failed: requests sent, finished with all their tokens, failed.
        max_concurrency, request_rate: the load (request_rate inf: all at once).
        input_len, output_len, range_ratio, prefix_len: the random dataset.
        duration_s: first request sent to last one done.
        total_input_tokens, total_output_tokens: over the completed requests.
        request_throughput, output_throughput, total_token_throughput: per second of duration.
        {mean,median,p99}_{ttft,tpot,itl,e2el}_ms: time to first token, time per output token after the
            first, inter-token latency (gaps between streamed outputs), end-to-end latency.
        p99_over_median_itl: the ITL tail ratio.
        cached_requests, mean_ttft_cached_ms, mean_ttft_cold_ms: requests that had prompt tokens from the
            prefix cache, and the mean TTFT with and without (where the target says how many).
        peak_cache_usage, cache_usage_after, num_preemptions, prefix_cache_queries, prefix_cache_hits,
            prefix_cache_hit_rate: the engine's, in-process, or from the server's /metrics where it exports
            them (cache_usage_after: once every request is done, 0 unless blocks leak; tokens for queries
            and hits; the peak sampled every 10 ms in-process, 250 ms over HTTP).
        static_decode_ms, static_decode_tokens_per_s, static_batch, static_context: the static decode step
            of `bench decode` at the concurrency and the mean context; vs_static: output_throughput over
            static_decode_tokens_per_s; median_itl_vs_static: median_itl_ms over static_decode_ms (the
            engine's typical step against the static one).
        baseline, vs_baseline: `--baseline FILE`, an earlier run's JSON (e.g. in-process beside this --url run),
            and output_throughput over its output_throughput.
        errors: the first distinct failure messages.
    """

    what: str
    impl: str
    target: str
    num_prompts: int
    completed: int
    failed: int
    max_concurrency: int
    request_rate: float
    input_len: int
    output_len: int
    range_ratio: float
    prefix_len: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    mean_ttft_ms: float | None = None
    median_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    mean_tpot_ms: float | None = None
    median_tpot_ms: float | None = None
    p99_tpot_ms: float | None = None
    mean_itl_ms: float | None = None
    median_itl_ms: float | None = None
    p99_itl_ms: float | None = None
    mean_e2el_ms: float | None = None
    median_e2el_ms: float | None = None
    p99_e2el_ms: float | None = None
    p99_over_median_itl: float | None = None
    cached_requests: int | None = None
    mean_ttft_cached_ms: float | None = None
    mean_ttft_cold_ms: float | None = None
    peak_cache_usage: float | None = None
    cache_usage_after: float | None = None
    num_preemptions: int | None = None
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_hit_rate: float | None = None
    static_decode_ms: float | None = None
    static_decode_tokens_per_s: float | None = None
    static_batch: int | None = None
    static_context: int | None = None
    vs_static: float | None = None
    median_itl_vs_static: float | None = None
    baseline: str | None = None
    vs_baseline: float | None = None
    errors: list[str] = field(default_factory=list)


def _spread(values_s: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, median, P99) in ms of values in seconds; Nones when there are none."""
    if not values_s:
        return None, None, None
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def summarize(results: Sequence[RequestResult], duration_s: float, impl: str, target: str, load: dict,
              engine_before: dict | None = None, engine_after: dict | None = None,
              peak_cache_usage: float | None = None) -> ServeRecord:
    """The record of one run: `load` holds num_prompts, max_concurrency, request_rate, input_len,
    output_len, range_ratio, prefix_len; the engine's counters (EngineWatch.settled, keys of SERVER_METRICS,
    any missing) are taken before and after."""
    done = [r for r in results if r.ok and r.output_tokens >= r.output_len]
    for r in results:
        if r.ok and r.output_tokens < r.output_len:
            r.error = f"{r.output_tokens} of {r.output_len} tokens"
    failed = [r for r in results if r not in done]
    inputs, outputs = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    duration_s = max(duration_s, 1e-9)
    record = ServeRecord("serve", impl, target, completed=len(done), failed=len(failed), duration_s=duration_s,
                         total_input_tokens=inputs, total_output_tokens=outputs,
                         request_throughput=len(done) / duration_s, output_throughput=outputs / duration_s,
                         total_token_throughput=(inputs + outputs) / duration_s, **load)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [gap for r in done for gap in r.itl]), ("e2el", [r.latency for r in done])):
        for stat, value in zip(("mean", "median", "p99"), _spread(values)):
            setattr(record, f"{stat}_{name}_ms", value)
    if record.median_itl_ms:
        record.p99_over_median_itl = record.p99_itl_ms / record.median_itl_ms
    if any(r.cached_tokens is not None for r in done):  # a server that says so only when some were cached
        cached = [r.ttft for r in done if r.cached_tokens]
        cold = [r.ttft for r in done if not r.cached_tokens]
        record.cached_requests = len(cached)
        record.mean_ttft_cached_ms = statistics.fmean(cached) * 1e3 if cached else None
        record.mean_ttft_cold_ms = statistics.fmean(cold) * 1e3 if cold else None
    before, after = engine_before or {}, engine_after or {}

    def grown(key: str) -> int | None:
        return round(after[key] - before[key]) if key in after and key in before else None

    if "cache_usage" in after:
        record.peak_cache_usage = max(peak_cache_usage or 0.0, after["cache_usage"])
        record.cache_usage_after = after["cache_usage"]
    record.num_preemptions = grown("num_preemptions")
    record.prefix_cache_queries, record.prefix_cache_hits = grown("prefix_queries"), grown("prefix_hits")
    if record.prefix_cache_queries and record.prefix_cache_hits is not None:
            record.prefix_cache_hit_rate = record.prefix_cache_hits / record.prefix_cache_queries
    record.errors = list(dict.fromkeys(r.error for r in failed if r.error))[:5]
    return record


def add_static(record: ServeRecord, step_ms: float, batch: int, context: int) -> None:
    """The static decode step's time beside the run, and the run's output rate over its rate."""
    record.static_decode_ms, record.static_batch, record.static_context = step_ms, batch, context
    record.static_decode_tokens_per_s = batch / (step_ms * 1e-3)
    record.vs_static = record.output_throughput / record.static_decode_tokens_per_s
    if record.median_itl_ms is not None:
        record.median_itl_vs_static = record.median_itl_ms / step_ms


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_record(r: ServeRecord) -> str:
    """vLLM `bench serve`'s result block, plus the engine's counters and the static-decode ratio."""
    rate = "inf" if math.isinf(r.request_rate) else f"{r.request_rate:g}"
    rows: list[tuple[str, str] | str] = [
        f" Serving benchmark result: {r.impl} ".center(60, "="),
        ("Successful requests:", f"{r.completed} of {r.num_prompts}"),
        ("Failed requests:", str(r.failed)),
        ("Maximum request concurrency:", str(r.max_concurrency)),
        ("Request rate (req/s):", rate),
        ("Benchmark duration (s):", f"{r.duration_s:.2f}"),
        ("Total input tokens:", str(r.total_input_tokens)),
        ("Total generated tokens:", str(r.total_output_tokens)),
        ("Request throughput (req/s):", f"{r.request_throughput:.2f}"),
        ("Output token throughput (tok/s):", f"{r.output_throughput:.2f}"),
        ("Total token throughput (tok/s):", f"{r.total_token_throughput:.2f}")]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name, title in titles.items():
        rows.append(f" {title} ".center(60, "-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append((f"{label} {name.upper()} (ms):", _fmt(getattr(r, f"{stat}_{name}_ms"), ".2f")))
    if r.p99_over_median_itl is not None:
        rows.append(("P99 / median ITL:", f"{r.p99_over_median_itl:.2f}"))
    if r.cached_requests is not None:
        rows.append(" Prefix cache ".center(60, "-"))
        rows.append(("Requests with cached prompt tokens:", str(r.cached_requests)))
        rows.append(("Mean TTFT cached / cold (ms):",
                     f"{_fmt(r.mean_ttft_cached_ms, '.2f')} / {_fmt(r.mean_ttft_cold_ms, '.2f')}"))
    if r.peak_cache_usage is not None or r.num_preemptions is not None:
        rows.append(" Engine ".center(60, "-"))
        rows.append(("Peak cache usage:", _percent(r.peak_cache_usage)))
        rows.append(("Cache usage once done:", _percent(r.cache_usage_after)))
        rows.append(("Preemptions:", _fmt(r.num_preemptions, "d")))
        rows.append(("Prefix cache hits (tokens):", f"{_fmt(r.prefix_cache_hits, 'd')} of "
                     f"{_fmt(r.prefix_cache_queries, 'd')} ({_percent(r.prefix_cache_hit_rate)})"))
    if r.vs_baseline is not None:
        rows.append(f" Against {r.baseline} ".center(60, "-"))
        rows.append(("Output throughput / baseline's:", f"{r.vs_baseline:.3f}"))
    if r.static_decode_ms is not None:
        rows.append(" Static batch decode (bench decode) ".center(60, "-"))
        rows.append((f"Step at batch {r.static_batch}, context {r.static_context} (ms):", f"{r.static_decode_ms:.3f}"))
        rows.append(("Static decode rate (tok/s):", f"{r.static_decode_tokens_per_s:.2f}"))
        rows.append(("Output throughput / static rate:", f"{r.vs_static:.3f}"))
        rows.append(("Median ITL / static step:", _fmt(r.median_itl_vs_static, ".3f")))
    rows.append("=" * 60)
    for error in r.errors:
        rows.append(f"failed: {error}")
    return "\n".join(row if isinstance(row, str) else f"{row[0]:<44}{row[1]:>16}" for row in rows)


def check_record(r: ServeRecord) -> list[str]:
    """The issues' targets this record speaks to, one line each: engine / static decode (with the static
    baseline), P99 / median ITL (with a finite request rate), cached / cold TTFT (at concurrency 1)."""
    lines = []
    if r.vs_baseline is not None:
        lines.append(f"output throughput / {r.baseline}: {r.vs_baseline:.3f} (issue 20's HTTP vs in-process target: "
                     ">= 0.9)")
    if r.vs_static is not None:
        lines.append(f"engine / static decode at batch {r.static_batch}: {r.vs_static:.3f} (target >= 0.9)")
    if r.p99_over_median_itl is not None and r.request_rate != math.inf:
        lines.append(f"P99 / median ITL with requests arriving: {r.p99_over_median_itl:.2f} (target <= 2)")
    if r.mean_ttft_cached_ms and r.mean_ttft_cold_ms and r.max_concurrency == 1:  # queueing would blur it
        lines.append(f"cached-prefix TTFT / cold TTFT: {r.mean_ttft_cached_ms / r.mean_ttft_cold_ms:.3f} "
                     f"(target <= 0.2)")
    return lines


def save_json(path: str | Path, payload: dict, records: Sequence[ServeRecord]) -> None:
    """`payload` (what, date, device, backend, model, environment, notes) with the records, as JSON."""
    rows = [{**asdict(r), "request_rate": "inf" if math.isinf(r.request_rate) else r.request_rate} for r in records]
    payload = {**payload, "records": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))


# ---- the command ---------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """`bench serve`'s options, and the engine's flags (dsv3.serving.args) that `bench` does not already
    have (--backend, --device and --config are bench's)."""
    import argparse

    from dsv3.serving.args import add_engine_arguments

    g = p.add_argument_group("serve (the load)")
    g.add_argument("--num-prompts", type=int, help="requests to send (default 1000 on an accelerator, 64 on the "
                   "CPU; --quick: 4 x the concurrency)")
    g.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request (default 1024)")
    g.add_argument("--output-len", type=int, default=128, help="tokens each request generates (default 128)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn uniformly within +- this "
                   "fraction of --input-len and --output-len (default 0)")
    g.add_argument("--prefix-len", type=int, default=0, help="random tokens shared by every prompt, before its "
                   "own --input-len (default 0)")
    g.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at most (default 64)")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests per second, Poisson arrivals "
                   "(default inf: all at once, held back by --max-concurrency)")
    g.add_argument("--num-warmups", type=int, help="short requests sent before the run, not counted (default: "
                   "the concurrency)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals (default 0)")
    g.add_argument("--url", help="drive an OpenAI-compatible server at URL (http://host:port) instead of an "
                   "engine in this process")
    g.add_argument("--model", help="--url: the model name to ask for (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="--url: bearer token (default "
                   "$OPENAI_API_KEY)")
    g.add_argument("--vocab-size", type=int, help="--url: prompt token ids are drawn below this (default: the "
                   "vocabulary of --ckpt, else of the built-in tiny checkpoint)")
    g.add_argument("--baseline", metavar="FILE", help="an earlier bench serve JSON (e.g. the in-process run) to "
                   "print this run's output throughput against")
    g.add_argument("--static-decode-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also time bench decode's static step at the concurrency and the mean context (default: "
                   "on an accelerator, in-process)")
    engine = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(engine)
    group = p.add_argument_group("serve (the engine, in-process)")
    taken = set(p._option_string_actions) | {"--random-weights"}  # --config here is always synthetic weights
    meanings = {"ckpt": "checkpoint to serve (default: synthetic weights of --config with --layers)",
                "max_model_len": "the longest sequence (default: the longest request of the run)"}
    for action in engine._actions:
        if not any(option in taken for option in action.option_strings):
            action.help = meanings.get(action.dest, action.help)
            group._add_action(action)


def _load(args, num_prompts: int) -> dict:
    return {"num_prompts": num_prompts, "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
            "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
            "prefix_len": args.prefix_len}


def _check(args) -> None:
    for name in ("input_len", "output_len", "max_concurrency"):
        if getattr(args, name) < 1:
            raise UsageError(f"bench serve: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("prefix_len", "seed"):
        if getattr(args, name) < 0:
            raise UsageError(f"bench serve: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError(f"bench serve: --num-prompts must be at least 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise UsageError(f"bench serve: --request-rate must be positive (inf: all at once), got {args.request_rate}")
    if not 0 <= args.range_ratio < 1:
        raise UsageError(f"bench serve: --range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"bench serve: --vocab-size must be at least 1, got {args.vocab_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (args.tp or 1) > 1 or (args.ep or 1) > 1:
        raise UsageError("bench serve: it drives one engine in one process; run it without torchrun, --tp or --ep")
    if args.num_warmups is not None and args.num_warmups < 0:
        raise UsageError(f"bench serve: --num-warmups must be >= 0, got {args.num_warmups}")
    if args.baseline:
        read_baseline(args.baseline)


def _num_prompts(args, on_host: bool) -> int:
    if args.num_prompts is not None:
        return args.num_prompts
    if args.quick:
        return 4 * args.max_concurrency
    return 64 if on_host else 1000


async def _drive(target, args, vocab_size: int, num_prompts: int):
    """Warm-up, then the run; (results, duration, engine stats before and after or Nones)."""
    requests = random_requests(num_prompts, args.input_len, args.output_len, vocab_size, args.range_ratio,
                               args.prefix_len, args.seed)
    warmups = args.max_concurrency if args.num_warmups is None else args.num_warmups
    if warmups:
        # other prompts (a different seed), so that the run's prompts find nothing of theirs in the prefix cache
        warm = random_requests(warmups, args.input_len, min(args.output_len, 4), vocab_size, 0.0, args.prefix_len,
                               args.seed + 1_000_003)
        results, _ = await run_load(target, warm, args.max_concurrency, tag="warmup")
        failed = [r.error for r in results if r.error]
        if failed:
            raise Dsv3Error(f"bench serve: {len(failed)} of {warmups} warm-up requests failed: {failed[0]}")
    watch = EngineWatch(target)
    before = await watch.settled()
    sampler = asyncio.create_task(watch.sample())
    try:
        results, duration = await run_load(target, requests, args.max_concurrency, args.request_rate, args.seed)
    finally:
        sampler.cancel()
    after = await watch.settled()
    return results, duration, before, after, watch.peak_cache_usage


def read_baseline(path: str) -> tuple[str, float]:
    """(who ran it, output tokens/s) of the first record of an earlier bench serve JSON."""
    try:
        earlier = json.loads(Path(path).read_text())["records"][0]
        return str(earlier["impl"]), float(earlier["output_throughput"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"bench serve: --baseline {path}: not a bench serve JSON ({_error(e)})") from None


def add_baseline(record: ServeRecord, path: str) -> None:
    """This run's output throughput over that of an earlier run (read_baseline)."""
    impl, throughput = read_baseline(path)
    record.baseline = f"{path} ({impl})"
    record.vs_baseline = record.output_throughput / throughput if throughput > 0 else None


def _report(args, record: ServeRecord, payload: dict) -> None:
    if args.baseline:
        add_baseline(record, args.baseline)
    print(format_record(record), flush=True)
    for line in check_record(record):
        print(line)
    if args.json:
        save_json(args.json, payload, [record])
        print(f"dsv3 bench serve: wrote {args.json}", file=sys.stderr)


def _payload(device: str, backend: str, ops: dict, model: dict, notes: list[str]) -> dict:
    """The JSON beside the records, as `bench decode` writes it."""
    from dsv3.bench.common import environment

    return {"what": "serve", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "backend": backend,
            "ops": ops, "model": model, "environment": environment(), "notes": notes}


def run_url(args) -> int:
    """`dsv3 bench serve --url URL`."""
    _check(args)
    num_prompts = _num_prompts(args, on_host=False)
    vocab_size = args.vocab_size or _vocab_size(args)

    async def main():
        target = HttpTarget(args.url, args.model, args.api_key, args.max_concurrency)
        try:
            model = await target.resolve_model()
            return model, *(await _drive(target, args, vocab_size, num_prompts))
        finally:
            await target.close()

    model, results, duration, before, after, peak = asyncio.run(main())
    record = summarize(results, duration, f"{args.url} {model}", args.url, _load(args, num_prompts), before, after,
                       peak)
    _report(args, record, _payload(args.url, "http", {}, {"name": model, "vocab_size": vocab_size}, []))
    return 0 if record.completed else 1


def _vocab_size(args) -> int:
    from dsv3.api import TINY_CHECKPOINT
    from dsv3.config import load_config

    return load_config(getattr(args, "ckpt", None) or TINY_CHECKPOINT).vocab_size


def _longest(args) -> int:
    """The longest request of the dataset: prefix, prompt and output, each at its +range_ratio end."""
    return (args.prefix_len + math.ceil(args.input_len * (1 + args.range_ratio))
            + math.ceil(args.output_len * (1 + args.range_ratio)))


def _load_model(args, static_context: int):
    """The Model (with its engine) of --ckpt, or of --config with --layers layers (default: as many as fit
    beside a cache for the concurrency at the longest request, as `bench decode` fits them)."""
    from dsv3.api import load_model
    from dsv3.backends.select import select
    from dsv3.config import load_config
    from dsv3.serving.args import check_engine_arguments, engine_options

    check_engine_arguments(args)
    backend, _ = select(args.backend, args.device)
    source, described = args.ckpt, {"ckpt": args.ckpt}
    if not args.ckpt:
        from dsv3.bench.harness import bench_config, fit_layers, free_memory

        base = load_config(args.config)
        layers = args.layers
        if layers is None:
            free = free_memory(backend.device)
            if free is None:
                raise UsageError("bench serve: pass --layers N with --config on the CPU (or --ckpt DIR)")
            precision = "fp8" if backend.capabilities.has_fp8 and args.precision in ("auto", "fp8") else "bf16"
            layers = fit_layers(base, precision, free, args.max_concurrency, max(_longest(args), static_context))
        source = bench_config(base, layers)
        described = {"config": str(base.source), "layers": layers,
                     "moe_layers": sum(source.is_moe_layer(i) for i in range(layers))}
    model = load_model(source, backend=backend, precision=args.precision, quiet=args.quiet, tp=args.tp, ep=args.ep,
                       **engine_options(args))
    described.update(precision=model.precision, max_model_len=model.max_model_len,
                     num_blocks=model.engine.config.num_blocks, block_size=model.engine.config.block_size,
                     max_num_seqs=model.engine.config.max_num_seqs,
                     max_num_batched_tokens=model.engine.config.max_num_batched_tokens,
                     enable_prefix_caching=model.engine.config.enable_prefix_caching,
                     enforce_eager=model.engine.config.enforce_eager)
    return model, described


def static_decode_ms(model, batch: int, context: int, quick: bool = False) -> tuple[float, str]:
    """(ms, "graph" or "eager"): `bench decode`'s static step (harness.StaticDecode) on the engine's model and
    cache pool, timed as `bench decode` times it: `batch` sequences with `context` random latents cached each,
    one new token each, replayed from a recording where the backend makes one. Run while the engine is idle:
    it overwrites the pool."""
    import torch

    from dsv3.bench.common import time_op
    from dsv3.bench.harness import BLOCK_SIZE, StaticDecode, fill_caches

    transformer, config = model.transformer, model.engine.config
    if config.block_size != BLOCK_SIZE:
        raise Dsv3Error(f"bench serve: the static step lays sequences out in blocks of {BLOCK_SIZE}; the engine's "
                        f"are {config.block_size} (--block-size)")
    needed = 1 + batch * -(-(context + 1) // BLOCK_SIZE)
    if needed > config.num_blocks:
        raise Dsv3Error(f"bench serve: the static step needs {needed} blocks, the engine's pool has "
                        f"{config.num_blocks}")
    device = transformer.backend.device
    fill_caches(transformer)
    g = torch.Generator(device).manual_seed(1)
    step = StaticDecode(transformer, torch.randint(0, transformer.config.vocab_size, (batch,), device=device,
                                                   generator=g), context)
    with torch.inference_mode():
        fn = step.recorded() if not config.enforce_eager and transformer.supports_graphs() else None
        mode = "eager" if fn is None else "graph"
        timing = time_op(fn or step.eager, [()], transformer.backend, graph=False, warmup=1 if quick else 2,
                         target_ms=100.0 if quick else 300.0, min_reps=2 if quick else 3, max_reps=20)
    return timing.median_ms, mode


def run_engine(args) -> int:
    """`dsv3 bench serve` in this process."""
    _check(args)
    static_context = args.prefix_len + args.input_len + args.output_len // 2
    if args.max_model_len is None:
        args.max_model_len = _longest(args)
    model, described = _load_model(args, static_context)
    device = model.backend.device
    num_prompts = _num_prompts(args, on_host=device.type == "cpu")
    static = args.static_decode_baseline
    if static is None:
        static = device.type != "cpu"
    notes: list[str] = []
    try:
        async def main():
            return await _drive(EngineTarget(model.async_engine), args, model.config.vocab_size, num_prompts)

        results, duration, before, after, peak = asyncio.run(main())
        name = model.backend.capabilities.name
        record = summarize(results, duration, f"dsv3 engine in-process ({name})", "in-process",
                           _load(args, num_prompts), before, after, peak)
        if static:
            try:
                ms, mode = static_decode_ms(model, args.max_concurrency, static_context, args.quick)
                add_static(record, ms, args.max_concurrency, static_context)
                notes.append(f"static decode step: {mode}")
            except Exception as e:  # noqa: BLE001 - no baseline is a note, not a failed run
                notes.append(f"static decode step not timed: {_error(e)}")
                print(f"dsv3 bench serve: static decode step not timed: {_error(e)}", file=sys.stderr)
    finally:
        model.shutdown()
    ops = dict(model.backend.capabilities.ops)
    _report(args, record, _payload(model.backend.device_name(), name, ops, described, notes))
    return 0 if record.completed else 1


def run_command(args, backend=None) -> int:
    """`dsv3 bench serve` (dsv3/commands/bench.py parses the options)."""
    if args.url:
        return run_url(args)
    return run_engine(args)
