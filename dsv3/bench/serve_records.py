"""`dsv3 bench serve`'s results: one ServeRecord per run (vLLM `bench serve`'s names and numbers), its
table, the issues' targets it speaks to, and its JSON beside the other benches'.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dsv3.bench.common import fmt
from dsv3.bench.serve_load import RequestResult, error_line
from dsv3.errors import UsageError

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


def read_baseline(path: str) -> tuple[str, float]:
    """(who ran it, output tokens/s) of the first record of an earlier bench serve JSON."""
    try:
        earlier = json.loads(Path(path).read_text())["records"][0]
        return str(earlier["impl"]), float(earlier["output_throughput"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"bench serve: --baseline {path}: not a bench serve JSON ({error_line(e)})") from None


def add_baseline(record: ServeRecord, path: str) -> None:
    """This run's output throughput over that of an earlier run (read_baseline)."""
    impl, throughput = read_baseline(path)
    record.baseline = f"{path} ({impl})"
    record.vs_baseline = record.output_throughput / throughput if throughput > 0 else None


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
            rows.append((f"{label} {name.upper()} (ms):", fmt(getattr(r, f"{stat}_{name}_ms"), ".2f")))
    if r.p99_over_median_itl is not None:
        rows.append(("P99 / median ITL:", f"{r.p99_over_median_itl:.2f}"))
    if r.cached_requests is not None:
        rows.append(" Prefix cache ".center(60, "-"))
        rows.append(("Requests with cached prompt tokens:", str(r.cached_requests)))
        rows.append(("Mean TTFT cached / cold (ms):",
                     f"{fmt(r.mean_ttft_cached_ms, '.2f')} / {fmt(r.mean_ttft_cold_ms, '.2f')}"))
    if r.peak_cache_usage is not None or r.num_preemptions is not None:
        rows.append(" Engine ".center(60, "-"))
        rows.append(("Peak cache usage:", _percent(r.peak_cache_usage)))
        rows.append(("Cache usage once done:", _percent(r.cache_usage_after)))
        rows.append(("Preemptions:", fmt(r.num_preemptions, "d")))
        rows.append(("Prefix cache hits (tokens):", f"{fmt(r.prefix_cache_hits, 'd')} of "
                     f"{fmt(r.prefix_cache_queries, 'd')} ({_percent(r.prefix_cache_hit_rate)})"))
    if r.vs_baseline is not None:
        rows.append(f" Against {r.baseline} ".center(60, "-"))
        rows.append(("Output throughput / baseline's:", f"{r.vs_baseline:.3f}"))
    if r.static_decode_ms is not None:
        rows.append(" Static batch decode (bench decode) ".center(60, "-"))
        rows.append((f"Step at batch {r.static_batch}, context {r.static_context} (ms):", f"{r.static_decode_ms:.3f}"))
        rows.append(("Static decode rate (tok/s):", f"{r.static_decode_tokens_per_s:.2f}"))
        rows.append(("Output throughput / static rate:", f"{r.vs_static:.3f}"))
        rows.append(("Median ITL / static step:", fmt(r.median_itl_vs_static, ".3f")))
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
