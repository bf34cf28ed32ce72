"""`dsv3 bench decode|prefill`: the floor's byte and FLOP accounting against hand computations, the
layer fit, the fast synthetic experts, and both commands end to end on the CPU (reference backend,
tiny config). On an NVIDIA GPU (marker `gpu`) the same runs with the CUDA backend and its graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3 import cli
from dsv3.bench import harness, model_steps, steps
from dsv3.bench.common import Roofline, save_json
from dsv3.checkpoint import RandomSource, WeightLoader
from dsv3.config import load_config
from dsv3.errors import Dsv3Error

ROOT = Path(__file__).resolve().parents[2]


# ---- the accounting, by hand on the tiny config ---------------------------------------------------
# tiny: hidden 128, vocab 512, 3 layers (1 dense with intermediate 256, then 2 MoE), 4 heads,
# q_lora 64, kv_lora 64, nope 32, rope 16, v 32; 8 experts of intermediate 128, top-2, 1 shared.
# An FP8 linear [out, in] is out*in bytes plus 4 bytes per 128x128 block.
ATTENTION_BYTES = ((64 * 128 + 4) + (4 * 48 * 64 + 4 * 2) + (80 * 128 + 4) + (128 * 128 + 4)  # q_a q_b kv_a o
                   + 4 * (32 + 32) * 64 * 2       # w_uk, w_uv in bf16
                   + (2 * 128 + 64 + 64) * 2)     # four norms in bf16
DENSE_MLP_BYTES = 2 * (256 * 128 + 4 * 2) + (128 * 256 + 4 * 2)
EXPERT_BYTES = 3 * (128 * 128 + 4)
ROUTER_BYTES = 8 * 128 * 4 + 8 * 4
LINEAR_MACS = 64 * 128 + 192 * 64 + 80 * 128 + 128 * 128  # attention multiply-adds per token
DENSE_MACS = LINEAR_MACS + 3 * 128 * 256
MOE_MACS = LINEAR_MACS + 3 * 128 * (2 * 128 + 128)     # two routed experts and the shared one


def test_decode_cost_by_hand(tiny_config):
    batch, context, hits = 2, 10, [3, 4]
    cost = steps.decode_cost(tiny_config, "fp8", batch, context, hits)
    layers = (ATTENTION_BYTES + DENSE_MLP_BYTES) + sum(ATTENTION_BYTES + ROUTER_BYTES + (h + 1) * EXPERT_BYTES
                                                      for h in hits)
    assert cost.weight_bytes == layers + batch * 128 * 2 + 128 * 2 + 512 * 128 * 2  # embed rows, norm, head
    assert cost.weight_bytes == 922880
    assert cost.cache_bytes == 3 * batch * (context + 1) * 80 * 2
    assert cost.output_bytes == batch * 512 * 4
    assert cost.fp8_flops == 2 * batch * (DENSE_MACS + 2 * MOE_MACS)
    attention = 4 * (32 * 64 + 11 * 80 + 11 * 64 + 64 * 32)  # q absorb, scores, values, w_uv per head
    assert cost.dense_flops == 2 * batch * (3 * attention + 2 * 8 * 128 + 128 * 512)


def test_prefill_cost_by_hand(tiny_config):
    tokens, hits = 6, [5, 6]
    cost = steps.prefill_cost(tiny_config, "fp8", tokens, hits)
    layers = (ATTENTION_BYTES + DENSE_MLP_BYTES) + sum(ATTENTION_BYTES + ROUTER_BYTES + (h + 1) * EXPERT_BYTES
                                                      for h in hits)
    assert cost.weight_bytes == layers + tokens * 128 * 2 + 128 * 2 + 512 * 128 * 2
    assert cost.cache_bytes == 3 * tokens * 80 * 2
    assert cost.output_bytes == 512 * 4  # the last token's logits only
    assert cost.fp8_flops == 2 * tokens * (DENSE_MACS + 2 * MOE_MACS)
    expansion = tokens * 64 * 4 * (32 + 32)
    attention = 21 * 4 * (48 + 32)  # 6 * 7 / 2 causal (query, key) pairs
    assert cost.dense_flops == 2 * (3 * (expansion + attention) + 2 * tokens * 8 * 128 + 128 * 512)


def test_bf16_weights_count_two_bytes_and_no_fp8_flops(tiny_config):
    fp8 = steps.decode_cost(tiny_config, "fp8", 1, 4, [2, 2])
    bf16 = steps.decode_cost(tiny_config, "bf16", 1, 4, [2, 2])
    assert bf16.fp8_flops == 0 and bf16.dense_flops == fp8.dense_flops + fp8.fp8_flops
    assert steps.linear_bytes(256, 384, "bf16") == 256 * 384 * 2
    assert steps.linear_bytes(256, 384, "fp8") == 256 * 384 + 4 * 2 * 3


def test_floor_is_the_larger_term():
    roofline = Roofline("test", copy_gbps=2000.0, bf16_tflops=500.0, fp8_tensorwise_tflops=None,
                        fp8_blockwise_tflops=1000.0)
    memory_bound = steps.StepCost(4e9, 1e9, 0.0, 1e12, 1e11)
    floor = steps.step_floor(memory_bound, roofline)
    assert floor.memory_ms == pytest.approx(5e9 / 2000e9 * 1e3)  # 2.5 ms
    assert floor.compute_ms == pytest.approx((1e12 / 1000e12 + 1e11 / 500e12) * 1e3)  # 1.2 ms
    assert (floor.ms, floor.limit) == (pytest.approx(2.5), "memory")
    compute_bound = steps.StepCost(1e9, 0.0, 0.0, 4e12, 0.0)
    assert steps.step_floor(compute_bound, roofline).limit == "compute"
    no_fp8 = Roofline("test", 2000.0, 500.0, None, None)  # FP8 FLOPs then count at the BF16 rate
    assert steps.step_floor(compute_bound, no_fp8).compute_ms == pytest.approx(8.0)


def test_expected_experts_hit():
    assert steps.expected_experts_hit(256, 8, 1) == pytest.approx(8.0)
    assert steps.expected_experts_hit(256, 8, 16) == pytest.approx(256 * (1 - (248 / 256) ** 16))
    assert 250 < steps.expected_experts_hit(256, 8, 128) < 256


def test_deepseek_v3_expert_and_layer_sizes():
    v3 = load_config("deepseek-v3")
    assert steps.expert_bytes(v3, "fp8") == 3 * 2048 * 7168 + 4 * 3 * 16 * 56
    assert 11.2e9 < 256 * steps.expert_bytes(v3, "fp8") < 11.4e9  # one MoE layer's routed experts


def test_bench_config_keeps_dense_layers_first_and_one_moe_layer():
    v3 = load_config("deepseek-v3")
    for layers, dense in ((1, 0), (2, 1), (4, 3), (7, 3)):
        c = harness.bench_config(v3, layers)
        assert (c.num_hidden_layers, c.first_k_dense_replace) == (layers, dense)
        assert [c.is_moe_layer(i) for i in range(layers)] == [False] * dense + [True] * (layers - dense)
    with pytest.raises(Dsv3Error):
        harness.bench_config(v3, 0)


def test_fit_layers_takes_the_most_that_fit():
    v3 = load_config("deepseek-v3")
    five = harness.model_memory_bytes(harness.bench_config(v3, 5), "fp8", 128, 8193)
    six = harness.model_memory_bytes(harness.bench_config(v3, 6), "fp8", 128, 8193)
    assert six - five > 11.2e9  # a MoE layer: its experts plus its cache
    assert harness.fit_layers(v3, "fp8", five / 0.85 + 1, 128, 8193) == 5
    assert harness.fit_layers(v3, "fp8", five / 0.85 - 1, 128, 8193) == 4
    assert harness.fit_layers(v3, "fp8", 84e9, 128, 8193) == 7  # an H100: 3 dense + 4 MoE
    with pytest.raises(Dsv3Error, match="one layer needs"):
        harness.fit_layers(v3, "fp8", 10e9, 128, 8193)


# ---- synthetic weights --------------------------------------------------------------------------

def test_fast_random_source_stacks_experts(tiny_config):
    source = RandomSource(tiny_config, fp8=True, seed=3, fast=True)
    gate_up, gate_up_scale, down, down_scale = source.stacked_experts("model.layers.1.mlp", range(8))
    assert gate_up.shape == (8, 256, 128) and gate_up.dtype == torch.float8_e4m3fn
    assert down.shape == (8, 128, 128) and down_scale.shape == (8, 1, 1)
    weights = gate_up.float() * gate_up_scale[0, 0, 0]
    assert torch.isfinite(weights).all()
    assert weights.std().item() == pytest.approx(128 ** -0.5, rel=0.05)  # as the block-quantized path
    assert gate_up.float().abs().max() <= 448
    again = RandomSource(tiny_config, fp8=True, seed=3, fast=True).stacked_experts("model.layers.1.mlp", range(8))
    assert torch.equal(again[0].view(torch.uint8), gate_up.view(torch.uint8))
    assert RandomSource(tiny_config, fp8=True, seed=3).stacked_experts("model.layers.1.mlp", range(8)) is None
    loader = WeightLoader(source, tiny_config, progress=False)
    assert torch.equal(loader.experts("model.layers.1.mlp", 8)[2].view(torch.uint8), down.view(torch.uint8))


def test_expert_counter_counts_each_moe_layer(tiny_config):
    from dsv3.backends.reference import ReferenceBackend

    backend = ReferenceBackend()
    model = harness.build_model(tiny_config, backend, "fp8", 2, 16)
    with harness.ExpertCounter(backend) as counter:
        logits = harness.StaticDecode(model, torch.tensor([3, 9]), 7).eager()
    assert torch.isfinite(logits).all()
    assert len(counter.hits) == 2 and all(2 <= h <= 4 for h in counter.hits)
    assert "moe_experts" not in vars(backend)


# ---- the commands on the CPU --------------------------------------------------------------------

def test_bench_decode_runs_on_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "decode.json"
    code = cli.main(["bench", "decode", "--config", "tiny", "--backend", "reference", "--quick",
                     "--batch", "1", "2", "--context", "8", "24", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dsv3 reference (eager)" in printed and "x floor" in printed
    payload = json.loads(out.read_text())
    records = payload["records"]
    assert [(r["batch"], r["context"]) for r in records] == [(1, 8), (1, 24), (2, 8), (2, 24)]
    for r in records:
        assert r["error"] is None and r["time_ms"] > 0 and r["floor_ms"] > 0
        assert r["vs_floor"] == pytest.approx(r["time_ms"] / r["floor_ms"])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["time_ms"] * 1e3)
        assert 1 <= r["experts_hit"] <= 8
    assert payload["model"]["layers"] == 3 and payload["model"]["moe_layers"] == 2
    assert any("records no graphs" in note for note in payload["notes"])
    assert payload["profile"]["rows"] and payload["profile"]["by"] == "cpu"


def test_bench_prefill_runs_on_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "prefill.json"
    assert cli.main(["bench", "prefill", "--config", "tiny", "--backend", "reference", "--quick",
                     "--tokens", "32", "--layers", "2", "--json", str(out)]) == 0
    assert "prefill 32 tokens" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())["records"]
    assert (record["what"], record["context"], record["layers"]) == ("prefill", 32, 2)
    assert record["time_ms"] > 0 and record["tokens_per_s"] == pytest.approx(32 / record["time_ms"] * 1e3)


def test_bench_profile_runs_on_cpu(tmp_path, capsys, one_thread):
    out = tmp_path / "profile.json"
    assert cli.main(["bench", "profile", "--config", "tiny", "--backend", "reference", "--layers", "2",
                     "--batch", "2", "--context", "16", "--tokens", "24", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== decode eager:" in printed and "== prefill eager:" in printed and "records no graphs" in printed
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"decode eager", "prefill eager"}  # the reference backend records no graphs
    for run in runs.values():
        profile = run["profile"]
        assert run["measured_ms"] > 0 and profile["by"] == "cpu" and profile["rows"]
        assert sum(r["percent"] for r in profile["rows"]) <= 100.0 + 1e-6
    assert "batch 2, context 16" in runs["decode eager"]["profile"]["what"]
    assert "2 layers" in runs["prefill eager"]["profile"]["what"]
    assert cli.main(["bench", "profile", "--config", "tiny", "--backend", "reference", "--tokens", "0"]) == 2
    assert "--tokens must be positive" in capsys.readouterr().err


def test_bench_rejects_bad_sizes(capsys):
    assert cli.main(["bench", "decode", "--config", "tiny", "--backend", "reference", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_summary_reads_a_saved_run(tmp_path, capsys):
    roofline = Roofline("H100", 3000.0, 700.0, None, 1000.0)
    cost = steps.decode_cost(load_config("tiny"), "fp8", 64, 1024, None)
    record = steps.make_record("decode", "dsv3 cuda (graph)", True, 64, 1024, 7, cost, roofline, 30.0, 64, None)
    record.metrics["vs_reference"] = 12.0
    path = tmp_path / "run.json"
    save_json(path, roofline, [record], {"device": "H100", "model": {"layers": 7}})
    model_steps.print_saved_runs([str(path)])
    out = capsys.readouterr().out
    vs_floor = record.metrics["vs_floor"]
    assert f"decode batch 64 context 1024: 30.000 ms, {vs_floor:.2f}x the floor" in out and "12.0x the reference" in out
    assert "dsv3 cuda (graph)  64" in out  # the table


# ---- the CUDA backend (NVIDIA GPU) ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.cuda
def test_decode_bench_command_on_cuda_tiny(tmp_path):
    """The whole command in a fresh process, as a real run goes: profile, graph and eager steps, the
    reference backend as the peer."""
    out = tmp_path / "decode.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dsv3", "bench", "decode", "--config", "tiny", "--backend", "cuda",
                             "--quick", "--batch", "1", "4", "--context", "64", "--json", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    timed = {(r["impl"], r["batch"]) for r in payload["records"] if r["time_ms"]}
    assert {("dsv3 cuda (graph)", 1), ("dsv3 cuda (eager)", 1), ("dsv3 cuda (graph)", 4),
            ("reference backend (eager)", 1)} <= timed
    assert all(r["vs_reference"] for r in payload["records"] if r["ours"] and r["batch"] == 1)
    assert payload["profile"]["by"] == "device" and payload["profile"]["rows"]


@pytest.mark.gpu
@pytest.mark.cuda
def test_prefill_bench_on_cuda_tiny(tmp_path, tiny_config):
    from dsv3.backends.cuda import CudaBackend

    (record,) = model_steps.run_prefill(CudaBackend(), tiny_config, tokens=256, quick=True)
    assert record.error is None and record.time_ms > 0 and record.metrics["fp8_rate_pct"] is not None


@pytest.mark.gpu
@pytest.mark.cuda
def test_profile_bench_on_cuda_tiny(tiny_config):
    from dsv3.backends.registry import create_backend

    from dsv3.bench.kernel_profile import run_profile

    runs = run_profile(create_backend("cuda"), tiny_config, batch=2, context=64, tokens=128)
    assert set(runs) == {"decode eager", "prefill eager", "decode replay"}
    assert all(run["profile"]["by"] == "device" and run["profile"]["rows"] for run in runs.values())
