"""`dsv3 doctor --plan`: the memory plan of a layout, and the layouts it refuses.

Two cases run the real command in a subprocess; the rest call the same entry point (dsv3.cli.main) in
this process, since starting Python and torch costs seconds a call on a busy 2-core CI machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_doctor import doctor

from dsv3.cli import main

V3_TP8_EP = ("--plan", "--model", "deepseek-v3", "-tp", "8", "--enable-expert-parallel")


@pytest.fixture
def dsv3(capsys):
    """Run `dsv3 doctor ARGS` in this process: a CompletedProcess-like (returncode, stdout, stderr)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(["doctor", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def test_the_command_prints_a_plan_and_refuses_a_layout():
    out = doctor(*V3_TP8_EP, "--devices", "H200x8")
    assert out.returncode == 0, out.stderr
    assert "per rank   weights 79.6 GiB + reserve 5.0 GiB of 126.4 GiB usable" in out.stdout
    assert "fits       yes" in out.stdout
    out = doctor("--plan", "-tp", "16")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "dsv3: error: --tensor-parallel-size 16 x --data-parallel-size 1 = 16 ranks, but H200x8 " \
                         "has 8 devices\n"


def test_v3_on_8_h200_with_tp_and_with_dp_attention(dsv3):
    """TP8/EP8 keeps one cache for all ranks; DP8/EP8 holds more weights per rank (all heads of attention on
    each) but eight caches of its own requests: far more tokens in total."""
    def plan(*args: str) -> dict:
        out = dsv3(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    tp = plan(*V3_TP8_EP, "--devices", "H200x8")
    dp = plan("--plan", "--model", "deepseek-v3", "-dp", "8", "--enable-expert-parallel", "--devices", "H200x8")
    assert (tp["ranks"], tp["tp"], tp["dp"], tp["ep"], tp["precision"]) == (8, 8, 1, 8, "fp8")
    assert (dp["ranks"], dp["tp"], dp["dp"], dp["ep"]) == (8, 1, 8, 8)
    for p in (tp, dp):
        assert p["fits"] and p["cache_bytes_per_token"] == 61 * 576 * 2
        assert p["cache_bytes"] == p["usable_bytes"] - p["weight_bytes"] - p["reserve_bytes"]
        assert p["cache_tokens_per_rank"] == p["cache_bytes"] // p["cache_bytes_per_token"]
    # 671B parameters, ~1 byte each in FP8: a rank holds an eighth of the experts plus its attention share
    assert 78 * 2**30 < tp["weight_bytes"] < 81 * 2**30
    assert dp["weight_bytes"] > tp["weight_bytes"] and dp["cache_tokens_total"] > 4 * tp["cache_tokens_total"]
    assert tp["cache_tokens_total"] == tp["cache_tokens_per_rank"]
    assert dp["cache_tokens_total"] == 8 * dp["cache_tokens_per_rank"]


def test_v3_text_plan_and_the_devices_it_does_not_fit(dsv3):
    out = dsv3(*V3_TP8_EP, "--devices", "MI300Xx8")
    assert out.returncode == 0, out.stderr
    assert "devices    MI300X x 8, 191.7 GiB each" in out.stdout and "fits       yes" in out.stdout
    out = dsv3(*V3_TP8_EP, "--devices", "H100x8")
    assert out.returncode == 1 and "fits" not in out.stdout
    assert out.stderr.startswith("dsv3: error: does not fit: each rank needs 79.6 GiB of weights + 5.0 GiB reserve")
    assert "but each H100 gives 71.7 GiB" in out.stderr


def test_910b_runs_v3_in_bf16_on_32(dsv3):
    out = dsv3("--plan", "--model", "deepseek-v3", "-tp", "32", "--enable-expert-parallel", "--devices", "910Bx32",
               "--json")
    p = json.loads(out.stdout)
    assert p["precision"] == "bf16" and p["fits"] and 40 * 2**30 < p["weight_bytes"] < 42 * 2**30
    out = dsv3("--plan", "--model", "deepseek-v3", "-tp", "16", "--enable-expert-parallel",
                 "--devices", "910Bx16")
    assert out.returncode == 1 and "does not fit" in out.stderr
    out = dsv3("--plan", "--model", "deepseek-v3", "-tp", "32", "--devices", "910B", "--precision", "fp8")
    assert out.returncode == 2 and "910B has no FP8" in out.stderr


@pytest.mark.parametrize("args,message", [
    (("--model", "tiny", "-tp", "8"), "has 4 attention heads (num_attention_heads), which 8 ranks cannot share"),
    (("--model", "tiny", "-dp", "3", "--devices", "H200x8", "--enable-expert-parallel"),
     "has 8 routed experts (n_routed_experts), which 3 ranks cannot share"),
    (("--model", "tiny", "-tp", "2", "--precision", "fp8"),
     "q_b_proj.weight [192, 64] would be cut into 96 rows per rank, not a multiple of the 128-wide FP8 blocks"),
    (("--devices", "B200x8",), "--devices B200x8: expected a device kind and count such as H200x8"),
    (("-dp", "0",), "-dp must be at least 1, got 0"),
])
def test_impossible_layouts_are_refused_naming_the_numbers(dsv3, args, message):
    out = dsv3("--plan", *args)
    assert out.returncode == 2 and message in out.stderr and out.stdout == "", out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def doc_rows() -> list[list[str]]:
    """The memory table of docs/parallel.md: the cells of each row that gives `dsv3 doctor --plan` arguments."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "parallel.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and "`--devices" in line]
    assert len(rows) >= 10
    return rows


@pytest.mark.parametrize("row", doc_rows(), ids=lambda row: row[1].strip("`"))
def test_the_memory_table_in_the_docs_is_what_the_command_prints(dsv3, row):
    _, args, weights, cache, per_rank, total, fits = row
    out = dsv3("--plan", "--model", "deepseek-v3", *args.strip("`").split(), "--json")
    p = json.loads(out.stdout)
    gib = 2**30
    assert [f"{p['weight_bytes'] / gib:.1f} GiB", f"{p['cache_bytes'] / gib:.1f} GiB",
            f"{p['cache_tokens_per_rank']:,}", f"{p['cache_tokens_total']:,}", "yes" if p["fits"] else "**no**"] \
        == [weights, cache, per_rank, total, fits]
    assert out.returncode == (0 if p["fits"] else 1)


def test_v2_lite_on_one_h100(dsv3):
    """A BF16 checkpoint stays bf16 on an FP8 device; one device holds the whole model."""
    out = dsv3("--plan", "--model", "deepseek-v2-lite", "--devices", "H100x1")
    assert out.returncode == 0, out.stderr
    assert "model      deepseek-v2-lite: bf16 weights" in out.stdout
    assert "layout     tp 1, dp 1, ep 1: 1 rank: the whole model on one device" in out.stdout
    assert "(31,104 bytes per token)" in out.stdout  # 27 layers x 576 x 2


def test_plan_flags_are_the_engine_flags(dsv3):
    """The layout flags come from EngineArgs (dsv3.commands.args), so serve's spellings plan too: --tp and vLLM's
    fp8_e4m3 cache name; a value a plan cannot size is one line naming the flag."""
    fp8 = dsv3("--plan", "--tp", "8", "--enable-expert-parallel", "--kv-cache-dtype", "fp8_e4m3", "--json")
    assert fp8.returncode == 0, fp8.stderr
    bf16 = dsv3("--plan", "--tp", "8", "--enable-expert-parallel", "--json")
    assert json.loads(fp8.stdout)["cache_tokens_per_rank"] > json.loads(bf16.stdout)["cache_tokens_per_rank"]
    refused = dsv3("--plan", "--precision", "fp32")
    assert refused.returncode == 2
    assert refused.stderr == "dsv3: error: --precision fp32: a plan takes auto, fp8 or bf16\n"
