"""GET /metrics: Prometheus metrics named like vLLM's, with a `dsv3:` prefix.

The engine's gauges and counters are read from AsyncEngine.stats() when scraped; latency histograms are
observed per request by the server (time to first token, time between streamed steps, end to end).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class EngineCollector(Collector):
    """The engine's state at scrape time: requests, cache usage, prefix cache, token and preemption counters."""

    def __init__(self, stats: Callable[[], Any], model_name: str):
        self._stats, self._labels = stats, {"model_name": model_name}

    def collect(self):
        stats = self._stats()
        for name, doc, value in (
                ("dsv3:num_requests_running", "Requests in the running batch.", stats.num_running),
                ("dsv3:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
                ("dsv3:kv_cache_usage_perc", "Fraction of cache blocks in use (1 = all).", stats.cache_usage)):
            yield self._family(GaugeMetricFamily, name, doc, value)
        for name, doc, value in (
                ("dsv3:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_queries),
                ("dsv3:prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_hits),
                ("dsv3:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens),
                ("dsv3:generation_tokens", "Tokens generated.", stats.generation_tokens),
                ("dsv3:num_preemptions", "Requests preempted for lack of cache blocks.", stats.num_preemptions)):
            yield self._family(CounterMetricFamily, name, doc, value)
        used = getattr(stats, "used_blocks_per_rank", ())
        if used:  # the engine's (a stand-in's stats may not say)
            yield self._family(GaugeMetricFamily, "dsv3:cache_blocks_per_rank",
                               "Cache blocks each rank holds (under DP attention each group its own).",
                               stats.num_blocks)
            family = GaugeMetricFamily("dsv3:kv_cache_used_blocks", "Cache blocks held by sequences, per DP group "
                                       "(every rank of a group holds the same blocks).",
                                       labels=[*self._labels, "dp_rank"])
            for group, blocks in enumerate(used):
                family.add_metric([*self._labels.values(), str(group)], float(blocks))
            yield family
        spec = getattr(stats, "spec_decode", None)
        if spec is not None:  # speculative decoding (--speculative-config)
            for name, doc, value in (
                    ("dsv3:spec_decode_num_drafts", "Draft runs verified (one per sequence and step).",
                     spec.num_drafts),
                    ("dsv3:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens),
                    ("dsv3:spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens)):
                yield self._family(CounterMetricFamily, name, doc, value)
            family = CounterMetricFamily("dsv3:spec_decode_num_accepted_tokens_per_pos",
                                         "Draft tokens accepted at each draft position.",
                                         labels=[*self._labels, "position"])
            for position, value in enumerate(spec.accepted_per_pos):
                family.add_metric([*self._labels.values(), str(position)], float(value))
            yield family

    def _family(self, kind, name, doc, value):
        family = kind(name, doc, labels=list(self._labels))
        family.add_metric(list(self._labels.values()), float(value))
        return family


class ServerMetrics:
    """The server's registry: the engine's collector and the per-request latency histograms.

    Args:
        stats: returns the engine's stats (AsyncEngine.stats).
        model_name: the served model name, a label on every metric.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], Any], model_name: str):
        disable_created_metrics()  # the *_created samples only repeat the start time (vLLM turns them off too)
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(EngineCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("dsv3:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("dsv3:inter_token_latency_seconds", "Time between successive output tokens.",
                             labels, buckets=ITL_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("dsv3:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.finished = Counter("dsv3:request_success", "Requests finished, by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's latencies, observed as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self.arrival = self._last = time.monotonic()
        self._num_tokens = 0

    def tokens(self, num_tokens: int) -> None:
        """Called with the request's token count (over all its choices) after each engine output."""
        new = num_tokens - self._num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self._num_tokens == 0:
            self._metrics.ttft.observe(now - self.arrival)
        else:
            for _ in range(new):  # tokens of one step arrive together: each is credited an equal share
                self._metrics.itl.observe((now - self._last) / new)
        self._num_tokens, self._last = num_tokens, now

    def finish(self, finish_reason: str | None) -> None:
        self._metrics.e2e.observe(time.monotonic() - self.arrival)
        self._metrics.finished.labels(self._metrics.model_name, finish_reason or "abort").inc()
