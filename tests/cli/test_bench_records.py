"""The one record of `dsv3 bench`: an op bench's rows finished against a roofline, its table, and the JSON every
bench writes (flat rows that read back into the same record)."""

from __future__ import annotations

import json
import math

import pytest

from dsv3.bench.common import Record, Roofline, finish, format_table, op_record, save_json

ROOFLINE = Roofline("test", copy_gbps=1000.0, bf16_tflops=100.0, fp8_tensorwise_tflops=None,
                    fp8_blockwise_tflops=200.0)


def _gemm_rows() -> list[Record]:
    ours = op_record("gemm", "M=1 N=2 K=3", "dsv3 gemm", True, flops=2e9, bytes_moved=5e6, compute="fp8_blockwise")
    peer = op_record("gemm", "M=1 N=2 K=3", "torch", False, 2e9, 1e7, "bf16")
    failed = op_record("gemm", "M=1 N=2 K=3", "reference", False, 2e9, 1e7, "fp8_blockwise", error="RuntimeError: no")
    other_case = op_record("gemm", "M=4 N=2 K=3", "torch", False, 2e9, 1e7, "bf16")
    ours.time_ms, peer.time_ms, other_case.time_ms = 0.02, 0.05, 0.01
    return [ours, peer, failed, other_case]


def test_finish_fills_rates_roofline_and_peer_ratios_of_the_same_case():
    ours, peer, failed, _ = records = _gemm_rows()
    finish(records, ROOFLINE)
    m = ours.metrics
    assert m["tflops"] == pytest.approx(100.0) and m["gbps"] == pytest.approx(250.0)
    assert m["limit"] == "compute" and m["roofline_pct"] == pytest.approx(100 * 0.01 / 0.02)  # 2e9 / 200e12 s
    assert m["vs_peers"] == {"torch": pytest.approx(2.5)}  # not the other case's torch row, nor the failed one
    assert peer.metrics["vs_peers"] == {}
    assert failed.metrics["roofline_pct"] is None and failed.metrics["tflops"] is None


def test_op_table_marks_ours_and_says_why_a_row_fails():
    records = _gemm_rows()
    finish(records, ROOFLINE)
    lines = format_table(records).splitlines()
    assert lines[0].split()[:3] == ["op", "case", "impl"] and set(lines[1]) <= {"-", " "}
    assert "* dsv3 gemm" in lines[2] and "torch 2.50" in lines[2] and "50 com" in lines[2]
    assert "fails" in lines[4] and lines[4].endswith("RuntimeError: no")


def test_json_rows_are_flat_and_read_back(tmp_path):
    records = _gemm_rows()
    finish(records, ROOFLINE)
    serve = Record("serve", "dsv3 engine in-process (reference)", True,
                   metrics={"request_rate": math.inf, "completed": 3, "errors": []})
    path = tmp_path / "out" / "bench.json"
    save_json(path, ROOFLINE, records + [serve], {"backend": "test"})
    payload = json.loads(path.read_text())  # plain JSON: no Infinity
    assert payload["backend"] == "test" and payload["roofline"]["copy_gbps"] == 1000.0
    assert "torch" in payload["environment"]
    row = payload["records"][0]
    assert (row["what"], row["case"], row["impl"], row["time_ms"], row["mode"]) == ("gemm", "M=1 N=2 K=3", "dsv3 gemm",
                                                                                   0.02, "")
    assert payload["records"][-1]["request_rate"] == "inf"
    again = [Record.from_dict(r) for r in payload["records"][:4]]
    assert again == records


def test_mla_decode_bench_over_the_fp8_cache_sets_the_bf16_cache_beside_it():
    """`dsv3 bench mla --kv-cache-dtype fp8`: dsv3's row reads 656 bytes a token, and dsv3 on the BF16 cache (1152)
    is a peer of the same case (run here on the reference backend, which the command refuses on a CPU)."""
    from dsv3.backends.reference import ReferenceBackend

    from dsv3.bench import mla

    backend, records = ReferenceBackend("cpu"), []
    mla.bench_decode(backend, None, backend.device, records, 16, 1, 128, "fp8")
    ours, bf16, torch_peer = records
    assert ours.ours and "fp8 latent cache" in ours.impl and "bf16 latent cache" in bf16.impl
    assert ours.metrics["bytes"] == 128 * 656 and bf16.metrics["bytes"] == torch_peer.metrics["bytes"] == 128 * 1152
    assert all(r.error is None and r.time_ms > 0 for r in records)
