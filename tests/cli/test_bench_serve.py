"""`dsv3 bench serve`: the random dataset and the summary by hand, then whole runs on the CPU: in-process on
the built-in tiny checkpoint, and `--url` against a real `dsv3 serve` process on a free port."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3 import cli
from dsv3.api import TINY_CHECKPOINT
from dsv3.bench import serve_load, serve_records

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "bench-key"
LOAD = {"num_prompts": 3, "max_concurrency": 2, "request_rate": math.inf, "input_len": 10, "output_len": 4,
        "range_ratio": 0.0, "prefix_len": 0}


# ---- the dataset and the arrivals ----------------------------------------------------------------

def test_random_requests_lengths_prefix_and_vocabulary():
    requests = serve_load.random_requests(200, 100, 20, vocab_size=50, range_ratio=0.5, prefix_len=7, seed=3)
    assert len(requests) == 200
    prefix = requests[0].prompt_token_ids[:7]
    for r in requests:
        assert r.prompt_token_ids[:7] == prefix
        assert 50 <= len(r.prompt_token_ids) - 7 <= 150 and 10 <= r.output_len <= 30
        assert all(0 <= t < 50 for t in r.prompt_token_ids)
    assert len({len(r.prompt_token_ids) for r in requests}) > 10  # the lengths do vary
    again = serve_load.random_requests(200, 100, 20, vocab_size=50, range_ratio=0.5, prefix_len=7, seed=3)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in requests]
    fixed = serve_load.random_requests(5, 16, 8, vocab_size=50)
    assert [(len(r.prompt_token_ids), r.output_len) for r in fixed] == [(16, 8)] * 5


def test_arrivals_all_at_once_or_poisson():
    assert serve_load.arrival_delays(4, math.inf, 0) == [0.0] * 4
    delays = serve_load.arrival_delays(4000, 20.0, 1)
    assert delays[0] == 0.0 and delays == sorted(delays)
    assert abs(delays[-1] / 3999 - 1 / 20.0) < 0.005  # mean gap 1 / rate


# ---- the summary ----------------------------------------------------------------------------------

def _result(ttft: float, itl: list[float], cached: int | None = None, error: str | None = None,
            output_len: int = 4) -> serve_load.RequestResult:
    tokens = 0 if error else len(itl) + 1
    return serve_load.RequestResult(10, output_len, tokens, None if error else ttft,
                               None if error else ttft + sum(itl), itl, cached, error)


def test_summary_by_hand():
    results = [_result(0.1, [0.01, 0.02, 0.03], cached=0), _result(0.3, [0.02, 0.02, 0.02], cached=8),
               _result(0.5, [], error="boom"), _result(0.2, [0.01], cached=0)]  # the last is 2 of 4 tokens
    before = {"num_preemptions": 1, "prefix_queries": 10, "prefix_hits": 0, "cache_usage": 0.0,
              "prompt_tokens": 0, "generation_tokens": 0}
    after = {**before, "num_preemptions": 3, "prefix_queries": 50, "prefix_hits": 10}
    record = serve_records.summarize(results, 2.0, "test", "in-process", {**LOAD, "num_prompts": 4}, before, after,
                                     0.5)
    r = record.metrics
    assert record.what == "serve" and record.ours and r["target"] == "in-process"
    assert (r["completed"], r["failed"]) == (2, 2)
    assert r["total_input_tokens"] == 20 and r["total_output_tokens"] == 8
    assert r["output_throughput"] == 4.0 and r["total_token_throughput"] == 14.0 and r["request_throughput"] == 1.0
    assert r["mean_ttft_ms"] == pytest.approx(200.0) and r["median_ttft_ms"] == pytest.approx(200.0)
    assert r["mean_tpot_ms"] == pytest.approx(20.0)
    assert r["median_itl_ms"] == pytest.approx(20.0) and r["p99_itl_ms"] == pytest.approx(29.5)
    assert r["mean_e2el_ms"] == pytest.approx((160 + 360) / 2)
    assert r["cached_requests"] == 1 and r["mean_ttft_cached_ms"] == pytest.approx(300.0)
    assert r["mean_ttft_cold_ms"] == pytest.approx(100.0)
    assert (r["num_preemptions"], r["prefix_cache_queries"], r["prefix_cache_hits"]) == (2, 40, 10)
    assert r["prefix_cache_hit_rate"] == 0.25 and r["peak_cache_usage"] == 0.5
    assert r["errors"] == ["boom", "2 of 4 tokens"]
    assert r["static_decode_ms"] is None and r["vs_baseline"] is None  # in the JSON, None until added
    serve_records.add_static(record, 100.0, 2, 12)
    assert r["static_decode_tokens_per_s"] == 20.0 and r["vs_static"] == 0.2
    serve_records.add_static_work(record, 50.0)  # 2 prompts x 50 ms, then 8 - 2 tokens at 20 tokens/s: 0.4 s
    assert r["static_work_s"] == pytest.approx(0.4) and r["vs_static_work"] == pytest.approx(0.4 / r["duration_s"])
    table = serve_records.format_record(record)
    for line in ("Successful requests:", "Output token throughput (tok/s):", "P99 ITL (ms):", "Preemptions:",
                 "Output throughput / static rate:", "Static time / engine time:", "failed: boom"):
        assert line in table
    row = record.to_dict()
    assert row["request_rate"] == "inf" and row["completed"] == 2 and row["time_ms"] is None  # flat, plain JSON
    json.dumps(row, allow_nan=False)


@pytest.mark.parametrize("flags, says", [
    (["--range-ratio", "1.5"], "--range-ratio must be in [0, 1)"),
    (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
    (["--request-rate", "0"], "--request-rate must be positive"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--prefix-len", "-1"], "--prefix-len must be >= 0"),
    (["--url", "http://127.0.0.1:9", "--num-warmups", "-1"], "--num-warmups must be >= 0"),
    (["--baseline", str(TINY_CHECKPOINT / "config.json")], "not a bench serve JSON"),
])
def test_bad_flags_are_one_line_before_anything_loads(flags, says, capsys):
    assert cli.main(["bench", "serve", "--ckpt", str(TINY_CHECKPOINT), "--backend", "reference", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 7.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 4096.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1024.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 99.0
"""


def test_server_metrics_of_vllm_by_their_names():
    assert serve_load.parse_metrics(VLLM_METRICS) == {"num_running": 4.0, "cache_usage": 0.25, "num_preemptions": 7.0,
                                                 "prefix_queries": 4096.0, "prefix_hits": 1024.0}
    assert serve_load.parse_metrics("# TYPE other_total counter\nother_total 1.0\n") == {}


# ---- whole runs --------------------------------------------------------------------------------------

def check_run(payload: dict, num_prompts: int, output_len: int, in_process: bool) -> dict:
    """The fields of a run's JSON, consistent with what was asked (fixed lengths, every request completed)."""
    assert payload["what"] == "serve" and "environment" in payload and "date" in payload
    [r] = payload["records"]
    assert r["what"] == "serve" and r["num_prompts"] == num_prompts
    assert r["completed"] == num_prompts and r["failed"] == 0 and r["errors"] == []
    assert r["total_output_tokens"] == num_prompts * output_len
    assert r["duration_s"] > 0
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx((r["total_input_tokens"] + r["total_output_tokens"])
                                                        / r["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{name}_ms"] <= r[f"p99_{name}_ms"], name
        assert r[f"mean_{name}_ms"] <= r[f"p99_{name}_ms"], name
    assert r["median_ttft_ms"] <= r["median_e2el_ms"]
    if in_process:
        assert 0 < r["peak_cache_usage"] <= 1 and r["cache_usage_after"] == 0  # every block freed
        assert r["num_preemptions"] >= 0 and r["prefix_cache_queries"] >= r["prefix_cache_hits"] >= 0
    return r


def test_in_process_on_the_tiny_checkpoint(tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = cli.main(["bench", "serve", "--ckpt", str(TINY_CHECKPOINT), "--backend", "reference",
                     "--num-prompts", "6", "--input-len", "24", "--output-len", "5", "--max-concurrency", "3",
                     "--prefix-len", "64", "--num-warmups", "1", "--static-decode-baseline", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Serving benchmark result" in printed and "Peak cache usage" in printed
    r = check_run(json.loads(out.read_text()), 6, 5, in_process=True)
    assert r["total_input_tokens"] == 6 * (64 + 24)
    assert r["prefix_cache_hits"] > 0  # the shared 64-token prefix is a full block for the later requests
    assert r["static_batch"] == 3 and r["static_context"] == 64 + 24 + 2 and r["static_decode_ms"] > 0
    assert r["vs_static"] == pytest.approx(r["output_throughput"] / r["static_decode_tokens_per_s"])


def test_in_process_on_synthetic_weights_of_a_config(tmp_path, capsys):
    """--config with --layers: random weights of the config's dimensions (the tiny model's here, V3's on a GPU)."""
    out = tmp_path / "serve.json"
    code = cli.main(["bench", "serve", "--config", str(TINY_CHECKPOINT / "config.json"), "--layers", "2",
                     "--backend", "reference", "--num-prompts", "4", "--input-len", "12", "--output-len", "3",
                     "--range-ratio", "0.5", "--max-concurrency", "4", "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["model"]["layers"] == 2 and payload["model"]["moe_layers"] == 1
    [r] = payload["records"]
    assert r["completed"] == 4 and r["failed"] == 0 and r["static_decode_ms"] is None  # off on the CPU by default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dsv3_server(tmp_path):
    """A real `dsv3 serve` of the tiny checkpoint on a free port, up once /health answers 200."""
    import httpx

    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "dsv3", "serve", "--port", str(port), "--backend", "reference",
               "--api-key", API_KEY]
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dsv3 serve did not answer /health in 120 s"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_url_against_dsv3_serve(dsv3_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    load = ["bench", "serve", "--url", dsv3_server, "--num-prompts", "6", "--input-len", "20", "--prefix-len", "64",
            "--output-len", "5", "--max-concurrency", "3", "--request-rate", "50"]
    baseline = tmp_path / "in_process.json"
    baseline.write_text(json.dumps({"records": [{"impl": "dsv3 engine in-process (reference)",
                                                 "output_throughput": 10.0}]}))
    code = cli.main([*load, "--api-key", API_KEY, "--baseline", str(baseline), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Serving benchmark result" in printed
    r = check_run(json.loads(out.read_text()), 6, 5, in_process=False)
    assert r["target"] == dsv3_server and r["request_rate"] == 50
    assert r["total_input_tokens"] == 6 * (64 + 20)
    assert r["cached_requests"] > 0  # the server's usage says how many prompt tokens its prefix cache served
    assert 0 <= r["peak_cache_usage"] <= 1 and r["cache_usage_after"] == 0  # from its /metrics (sampled 4x a second)
    assert r["prefix_cache_hits"] > 0 and r["num_preemptions"] == 0
    assert r["vs_baseline"] == pytest.approx(r["output_throughput"] / 10.0) and "in-process" in r["baseline"]
    assert "(against the same load in-process, target >= 0.9: HTTP costs at most 10%)" in printed

    assert cli.main([*load, "--api-key", "wrong"]) == 2  # /v1/models answers 401: one line, no run
    assert "401" in capsys.readouterr().err


def test_structured_output_run_with_the_backend_from_the_hardware(tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = cli.main(["bench", "serve", "--ckpt", str(TINY_CHECKPOINT), "--num-prompts", "4", "--input-len", "16",
                     "--output-len", "6", "--max-concurrency", "2", "--num-warmups", "0", "--structured-output",
                     "json", "--json", str(out)])  # no --backend: picked from the hardware, as dsv3 serve does
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    r = json.loads(out.read_text())["records"][0]
    assert r["json_completed"] == 4 and r["json_median_tpot_ms"] > 0 and r["json_tpot_overhead"] is not None
    assert "JSON schema on every request" in printed.err


@pytest.mark.parametrize("given, context, expected", [
    ({}, None, (1024, 128)), ({}, 1024, (911, 113)), ({"input_len": 100}, 1024, (100, 113)),
    ({"prefix_len": 512}, 1024, (456, 56)), ({"output_len": 7}, 4096, (1024, 7)),
])
def test_default_lengths_fit_the_models_context(given, context, expected):
    import argparse

    from dsv3.bench.serve import _default_lengths

    args = argparse.Namespace(**{"input_len": None, "output_len": None, "prefix_len": 0, **given})
    _default_lengths(args, context)
    assert (args.input_len, args.output_len) == expected
