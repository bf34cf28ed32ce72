"""`dsv3 bench serve`'s results: one common.Record per run whose metrics carry vLLM `bench serve`'s names
and numbers, its result block, and the targets it speaks to.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from dsv3.bench.common import Record, error_line, fmt
from dsv3.bench.serve_load import RequestResult
from dsv3.errors import UsageError


def _spread(values_s: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, median, P99) in ms of values in seconds; Nones when there are none."""
    if not values_s:
        return None, None, None
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def summarize(results: Sequence[RequestResult], duration_s: float, impl: str, target: str, load: dict,
              engine_before: dict | None = None, engine_after: dict | None = None,
              peak_cache_usage: float | None = None) -> Record:
    """The record of one load run (times in ms).

    Args:
        results: every request of the run.
        duration_s: first request sent to last one done.
        impl: who served it: "dsv3 engine in-process (<backend>)" or the URL and model.
        target: "in-process" (a dsv3 row: ours) or the URL.
        load: num_prompts, max_concurrency, request_rate (inf: all at once), input_len, output_len, range_ratio,
            prefix_len.
        engine_before, engine_after: the engine's counters (EngineWatch.settled, keys of SERVER_METRICS, any
            missing).
        peak_cache_usage: sampled during the run (every 10 ms in-process, 250 ms over HTTP).
    Returns:
        A Record("serve") whose metrics are, besides target and the load: completed, failed (requests finished
        with all their tokens, failed); duration_s; total_input_tokens, total_output_tokens (of the completed);
        request_throughput, output_throughput, total_token_throughput (per second of duration);
        {mean,median,p99}_{ttft,tpot,itl,e2el}_ms (time to first token, time per output token after the first,
        inter-token latency: gaps between streamed outputs, end-to-end latency); p99_over_median_itl;
        cached_requests, mean_ttft_cached_ms, mean_ttft_cold_ms (requests that had prompt tokens from the prefix
        cache, where the target says how many); peak_cache_usage, cache_usage_after (once every request is
        done: 0 unless blocks leak), num_preemptions, prefix_cache_queries, prefix_cache_hits (tokens),
        prefix_cache_hit_rate (the engine's, or from the server's /metrics where it exports them); the static
        decode step's numbers (add_static) and the baseline's (add_baseline), None until added; errors (the
        first distinct failure messages).
    """
    done = [r for r in results if r.ok and r.output_tokens >= r.output_len]
    for r in results:
        if r.ok and r.output_tokens < r.output_len:
            r.error = f"{r.output_tokens} of {r.output_len} tokens"
    failed = [r for r in results if r not in done]
    inputs, outputs = sum(r.prompt_len for r in done), sum(r.output_tokens for r in done)
    duration_s = max(duration_s, 1e-9)
    m = {"target": target, **load, "completed": len(done), "failed": len(failed), "duration_s": duration_s,
         "total_input_tokens": inputs, "total_output_tokens": outputs, "request_throughput": len(done) / duration_s,
         "output_throughput": outputs / duration_s, "total_token_throughput": (inputs + outputs) / duration_s}
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [gap for r in done for gap in r.itl]), ("e2el", [r.latency for r in done])):
        for stat, value in zip(("mean", "median", "p99"), _spread(values)):
            m[f"{stat}_{name}_ms"] = value
    m["p99_over_median_itl"] = m["p99_itl_ms"] / m["median_itl_ms"] if m["median_itl_ms"] else None
    m["cached_requests"] = m["mean_ttft_cached_ms"] = m["mean_ttft_cold_ms"] = None
    if any(r.cached_tokens is not None for r in done):  # a server that says so only when some were cached
        cached = [r.ttft for r in done if r.cached_tokens]
        cold = [r.ttft for r in done if not r.cached_tokens]
        m["cached_requests"] = len(cached)
        m["mean_ttft_cached_ms"] = statistics.fmean(cached) * 1e3 if cached else None
        m["mean_ttft_cold_ms"] = statistics.fmean(cold) * 1e3 if cold else None
    before, after = engine_before or {}, engine_after or {}

    def grown(key: str) -> int | None:
        return round(after[key] - before[key]) if key in after and key in before else None

    m["peak_cache_usage"] = m["cache_usage_after"] = None
    if "cache_usage" in after:
        m["peak_cache_usage"] = max(peak_cache_usage or 0.0, after["cache_usage"])
        m["cache_usage_after"] = after["cache_usage"]
    m["num_preemptions"] = grown("num_preemptions")
    m["prefix_cache_queries"], m["prefix_cache_hits"] = grown("prefix_queries"), grown("prefix_hits")
    m["prefix_cache_hit_rate"] = None
    if m["prefix_cache_queries"] and m["prefix_cache_hits"] is not None:
        m["prefix_cache_hit_rate"] = m["prefix_cache_hits"] / m["prefix_cache_queries"]
    m.update(dict.fromkeys(("static_decode_ms", "static_decode_tokens_per_s", "static_batch", "static_context",
                            "vs_static", "median_itl_vs_static", "static_prefill_ms", "static_work_s",
                            "vs_static_work", "baseline", "vs_baseline")))
    m["errors"] = list(dict.fromkeys(r.error for r in failed if r.error))[:5]
    return Record("serve", impl, ours=target == "in-process", metrics=m)


def add_static(record: Record, step_ms: float, batch: int, context: int) -> None:
    """The static decode step of `bench decode` at the concurrency and the mean context beside the run:
    static_decode_ms, static_batch, static_context, static_decode_tokens_per_s; vs_static (output_throughput
    over the static rate) and median_itl_vs_static (the engine's typical step over the static one)."""
    m = record.metrics
    m["static_decode_ms"], m["static_batch"], m["static_context"] = step_ms, batch, context
    m["static_decode_tokens_per_s"] = batch / (step_ms * 1e-3)
    m["vs_static"] = m["output_throughput"] / m["static_decode_tokens_per_s"]
    if m["median_itl_ms"] is not None:
        m["median_itl_vs_static"] = m["median_itl_ms"] / step_ms


def add_static_work(record: Record, prefill_ms: float) -> None:
    """The same work done statically, after add_static: every completed request's prompt prefilled alone
    (`prefill_ms` each, eager, as bench prefill runs it), then its other output tokens decoded at the static
    step's rate. static_work_s is that time, vs_static_work that time over the run's duration: the engine's
    throughput over a static path's on the same tokens (1.0: the engine costs nothing)."""
    m = record.metrics
    decoded = m["total_output_tokens"] - m["completed"]  # each request's first token comes from its prefill
    m["static_prefill_ms"] = prefill_ms
    m["static_work_s"] = m["completed"] * prefill_ms * 1e-3 + decoded / m["static_decode_tokens_per_s"]
    m["vs_static_work"] = m["static_work_s"] / m["duration_s"]


def add_speculative(record: Record, before: dict, after: dict, plain: Record) -> None:
    """Speculative decoding beside the same engine without it on the same load (`plain`, run after it):
    spec_num_drafts, spec_acceptance_rate (accepted over proposed draft tokens), spec_mean_acceptance_length
    (tokens per verify step: accepted drafts plus the target's own), plain_output_throughput, plain_median_tpot_ms,
    spec_speedup (output throughput over the plain run's) and spec_tpot_speedup (plain median TPOT over this)."""
    m, p = record.metrics, plain.metrics
    drafts, proposed, accepted = (after.get(k, 0) - before.get(k, 0) for k in
                                  ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens"))
    m["spec_num_drafts"] = drafts
    m["spec_acceptance_rate"] = accepted / proposed if proposed else None
    m["spec_mean_acceptance_length"] = 1 + accepted / drafts if drafts else None
    m["plain_output_throughput"], m["plain_median_tpot_ms"] = p["output_throughput"], p["median_tpot_ms"]
    m["spec_speedup"] = m["output_throughput"] / p["output_throughput"] if p["output_throughput"] else None
    m["spec_tpot_speedup"] = (p["median_tpot_ms"] / m["median_tpot_ms"]
                              if p["median_tpot_ms"] and m["median_tpot_ms"] else None)


def read_baseline(path: str) -> tuple[str, float]:
    """(who ran it, output tokens/s) of the first record of an earlier bench serve JSON."""
    try:
        earlier = json.loads(Path(path).read_text())["records"][0]
        return str(earlier["impl"]), float(earlier["output_throughput"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UsageError(f"bench serve: --baseline {path}: not a bench serve JSON ({error_line(e)})") from None


def add_baseline(record: Record, path: str) -> None:
    """This run's output throughput over that of an earlier run (read_baseline): baseline (the file and who ran
    it) and vs_baseline."""
    impl, throughput = read_baseline(path)
    m = record.metrics
    m["baseline"] = f"{path} ({impl})"
    m["vs_baseline"] = m["output_throughput"] / throughput if throughput > 0 else None


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_record(record: Record) -> str:
    """vLLM `bench serve`'s result block, plus the engine's counters and the static-decode ratio."""
    m = record.metrics
    rate = "inf" if math.isinf(m["request_rate"]) else f"{m['request_rate']:g}"
    rows: list[tuple[str, str] | str] = [
        f" Serving benchmark result: {record.impl} ".center(60, "="),
        ("Successful requests:", f"{m['completed']} of {m['num_prompts']}"),
        ("Failed requests:", str(m["failed"])),
        ("Maximum request concurrency:", str(m["max_concurrency"])),
        ("Request rate (req/s):", rate),
        ("Benchmark duration (s):", f"{m['duration_s']:.2f}"),
        ("Total input tokens:", str(m["total_input_tokens"])),
        ("Total generated tokens:", str(m["total_output_tokens"])),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name, title in titles.items():
        rows.append(f" {title} ".center(60, "-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            rows.append((f"{label} {name.upper()} (ms):", fmt(m[f"{stat}_{name}_ms"], ".2f")))
    if m["p99_over_median_itl"] is not None:
        rows.append(("P99 / median ITL:", f"{m['p99_over_median_itl']:.2f}"))
    if m["cached_requests"] is not None:
        rows.append(" Prefix cache ".center(60, "-"))
        rows.append(("Requests with cached prompt tokens:", str(m["cached_requests"])))
        rows.append(("Mean TTFT cached / cold (ms):",
                     f"{fmt(m['mean_ttft_cached_ms'], '.2f')} / {fmt(m['mean_ttft_cold_ms'], '.2f')}"))
    if m["peak_cache_usage"] is not None or m["num_preemptions"] is not None:
        rows.append(" Engine ".center(60, "-"))
        rows.append(("Peak cache usage:", _percent(m["peak_cache_usage"])))
        rows.append(("Cache usage once done:", _percent(m["cache_usage_after"])))
        rows.append(("Preemptions:", fmt(m["num_preemptions"], "d")))
        rows.append(("Prefix cache hits (tokens):", f"{fmt(m['prefix_cache_hits'], 'd')} of "
                     f"{fmt(m['prefix_cache_queries'], 'd')} ({_percent(m['prefix_cache_hit_rate'])})"))
    if m["vs_baseline"] is not None:
        rows.append(f" Against {m['baseline']} ".center(60, "-"))
        rows.append(("Output throughput / baseline's:", f"{m['vs_baseline']:.3f}"))
    if m.get("spec_speedup") is not None:
        rows.append(" Speculative decoding (same load, without it) ".center(60, "-"))
        rows.append(("Verify steps (drafts):", str(m["spec_num_drafts"])))
        rows.append(("Draft acceptance rate:", _percent(m["spec_acceptance_rate"])))
        rows.append(("Mean acceptance length (tokens/step):", fmt(m["spec_mean_acceptance_length"], ".3f")))
        rows.append(("Output throughput without (tok/s):", f"{m['plain_output_throughput']:.2f}"))
        rows.append(("Median TPOT without (ms):", fmt(m["plain_median_tpot_ms"], ".2f")))
        rows.append(("Speed-up, output throughput:", f"{m['spec_speedup']:.3f}"))
        rows.append(("Speed-up, median TPOT:", fmt(m["spec_tpot_speedup"], ".3f")))
    if m["static_decode_ms"] is not None:
        rows.append(" Static batch decode (bench decode) ".center(60, "-"))
        rows.append((f"Step at batch {m['static_batch']}, context {m['static_context']} (ms):",
                     f"{m['static_decode_ms']:.3f}"))
        rows.append(("Static decode rate (tok/s):", f"{m['static_decode_tokens_per_s']:.2f}"))
        rows.append(("Output throughput / static rate:", f"{m['vs_static']:.3f}"))
        rows.append(("Median ITL / static step:", fmt(m["median_itl_vs_static"], ".3f")))
    if m["static_work_s"] is not None:
        rows.append(("Static prefill of one prompt (ms):", f"{m['static_prefill_ms']:.3f}"))
        rows.append(("Static time for the same work (s):", f"{m['static_work_s']:.2f}"))
        rows.append(("Static time / engine time:", f"{m['vs_static_work']:.3f}"))
    rows.append("=" * 60)
    for error in m["errors"]:
        rows.append(f"failed: {error}")
    return "\n".join(row if isinstance(row, str) else f"{row[0]:<44}{row[1]:>16}" for row in rows)


def check_record(record: Record) -> list[str]:
    """The targets this record speaks to, one line each: engine / static decode (with the static
    baseline), P99 / median ITL (with a finite request rate), cached / cold TTFT (at concurrency 1)."""
    m, lines = record.metrics, []
    if m["vs_baseline"] is not None:
        lines.append(f"output throughput / {m['baseline']}: {m['vs_baseline']:.3f} (against the same load "
                     "in-process, target >= 0.9: HTTP costs at most 10%)")
    if m["vs_static"] is not None:
        lines.append(f"engine / static decode at batch {m['static_batch']}: {m['vs_static']:.3f} (target >= 0.9)")
    if m["vs_static_work"] is not None:
        lines.append(f"engine / static path on the same tokens (each prompt prefilled, then decoded at batch "
                     f"{m['static_batch']}): {m['vs_static_work']:.3f} (the engine's cost; >= 0.9: at most 10%)")
    if m["p99_over_median_itl"] is not None and m["request_rate"] != math.inf:
        lines.append(f"P99 / median ITL with requests arriving: {m['p99_over_median_itl']:.2f} (target <= 2)")
    if m["mean_ttft_cached_ms"] and m["mean_ttft_cold_ms"] and m["max_concurrency"] == 1:  # queueing would blur it
        lines.append(f"cached-prefix TTFT / cold TTFT: {m['mean_ttft_cached_ms'] / m['mean_ttft_cold_ms']:.3f} "
                     f"(target <= 0.2)")
    return lines
