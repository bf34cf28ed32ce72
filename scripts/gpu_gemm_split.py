"""The one-launch split-K FP8 GEMM on every DeepSeek-V3 and V2-Lite decode weight at M = 1-16, on an
NVIDIA GPU.

Per weight and M: the decode GEMM timed in CUDA graphs (dsv3.bench.common.time_op, weight copies
rotated so that they come from memory, as in a decode step), GB/s over the weight bytes and percent of
the copy bandwidth measured in the same run; its output checked against torch math (fp32 on the
dequantized operands), a second call and a graph replay against the first call, bit for bit. Also a
call recorded in a graph while the cached tile counters are too small (its counters come from the
graph). Then, unless --no-sweep, a few candidate decode tiles (and split waves) at M = 1 (what
KernelConfigs.gemm_decode serves) and M = 4, 16 (gemm_decode_batch), each summed over the weights: the
winner per M range is what to put in backends/triton_kernels/configs.py. The sweep stops at --budget-s
seconds from the start (what it skipped is printed).

Usage (repository root, on the GPU machine):
    python3 scripts/gpu_gemm_split.py --json gemm_split.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from dsv3.backends import fp8
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import gemm
from dsv3.backends.triton_kernels.configs import BATCH_TILE_MAX_M, KernelConfigs, TileConfig

from dsv3.bench.common import measure_roofline, rotation_count, time_op
from dsv3.config import ModelConfig, load_config

M_VALUES = (1, 2, 4, 8, 16)
#: (name, tile, decode waves): the sm_90 defaults first, then what the one-launch sum may shift: more
#: splits (waves 8) now that a split costs no extra launch, fewer (waves 2) for a shorter summing tail,
#: wider and narrower tiles
CANDIDATES = (
    ("64/8w/3s x4", TileConfig(16, 64, 1, {"num_warps": 8, "num_stages": 3}), 4.0),
    ("64/4w/3s x4", TileConfig(16, 64, 1, {"num_warps": 4, "num_stages": 3}), 4.0),
    ("64/4w/4s x8", TileConfig(16, 64, 1, {"num_warps": 4, "num_stages": 4}), 8.0),
    ("64/8w/4s x2", TileConfig(16, 64, 1, {"num_warps": 8, "num_stages": 4}), 2.0),
    ("128/8w/3s x4", TileConfig(16, 128, 1, {"num_warps": 8, "num_stages": 3}), 4.0),
    ("32/4w/4s x4", TileConfig(16, 32, 1, {"num_warps": 4, "num_stages": 4}), 4.0),
)
#: M values the sweep times per range of KernelConfigs.decode_gemm_tile
SWEEP_M = {"M=1 (gemm_decode)": (1,), f"M=2-{BATCH_TILE_MAX_M} (gemm_decode_batch)": (4, 16)}


def decode_weights(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, N, K) of every FP8 linear a decode step runs per layer, fused as dsv3/model.py fuses them."""
    c = config
    if c.q_lora_rank is None:
        shapes = [("q_proj", c.num_attention_heads * c.qk_head_dim, c.hidden_size),
                  ("kv_a", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)]
    else:
        shapes = [("q_a+kv_a", c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
                  ("q_b", c.num_attention_heads * c.qk_head_dim, c.q_lora_rank)]
    shapes.append(("o_proj", c.hidden_size, c.num_attention_heads * c.v_head_dim))
    if c.first_k_dense_replace:
        shapes += [("dense gate+up", 2 * c.intermediate_size, c.hidden_size),
                   ("dense down", c.hidden_size, c.intermediate_size)]
    if c.n_shared_experts:
        shared = c.n_shared_experts * c.moe_intermediate_size
        shapes += [("shared gate+up", 2 * shared, c.hidden_size), ("shared down", c.hidden_size, shared)]
    return shapes


def torch_gemm(qa: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The block-scaled GEMM in fp32 torch math on the dequantized operands."""
    a = qa.float() * sa.float().repeat_interleave(fp8.BLOCK, dim=1)[:, :qa.shape[1]]
    return a @ fp8.dequantize_blocks(w, s, torch.float32).t()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def with_decode_tile(configs: KernelConfigs, tile: TileConfig, waves: float) -> KernelConfigs:
    return replace(configs, gemm_decode=tile, gemm_decode_batch=tile, decode_waves=waves)


class Shape:
    """One weight's FP8 copies (enough to rotate through more bytes than the L2 holds) and activations."""

    def __init__(self, backend: CudaBackend, model: str, name: str, n: int, k: int, generator: torch.Generator):
        self.model, self.name, self.n, self.k = model, name, n, k
        w, s = fp8.quantize_blocks(torch.randn(n, k, device=backend.device, generator=generator) / k ** 0.5)
        w = w.contiguous()
        self.weight_bytes = w.numel() + 4 * s.numel()
        self.copies = [(w.clone(), s.clone()) for _ in range(rotation_count(self.weight_bytes))]
        self.activations = {m: backend.quantize_activation(
            torch.randn(m, k, device=backend.device, generator=generator).to(torch.bfloat16)) for m in M_VALUES}

    def time_us(self, backend: CudaBackend, configs: KernelConfigs, m: int) -> float:
        """Median microseconds of one call, replayed in a CUDA graph over the weight copies."""
        def run(qa, sa, w, s):
            return gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms)

        qa, sa = self.activations[m]
        return time_op(run, [(qa, sa, w, s) for w, s in self.copies], backend, target_ms=10).median_ms * 1e3

    def check(self, backend: CudaBackend, configs: KernelConfigs, m: int) -> tuple[float, bool]:
        """Relative error against torch math, and whether a second call and a graph replay equal the first."""
        qa, sa = self.activations[m]
        w, s = self.copies[0]
        first = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms)
        second = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(first, second) and torch.equal(first, replayed)
        return relative_error(first, torch_gemm(qa, sa, w, s)), same


def check_counters_grown_in_capture(backend: CudaBackend) -> dict:
    """A call with more output tiles than the cached counters hold, first met inside a graph capture, is
    refused with a BackendError (it would allocate counters that outlive the capture); run once outside a
    capture, it grows the counters, and its recording then replays bit for bit as the eager call."""
    from dsv3.backends.errors import BackendError

    device, configs = backend.device, backend.configs
    block_n = configs.decode_gemm_tile(1).block_n
    cached = gemm.tile_counters(device, 1).numel()
    k = 2 * fp8.BLOCK
    qa, sa = backend.quantize_activation(torch.randn(1, k, device=device).to(torch.bfloat16))
    w, s = fp8.quantize_blocks(torch.randn((cached + 1) * block_n, k, device=device))
    w = w.contiguous()
    torch.cuda.synchronize()
    refused = False
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms, num_splits=2)
    except BackendError:
        refused = True
    torch.cuda.synchronize()
    eager = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms, num_splits=2)  # grows the cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, backend.num_sms, num_splits=2)
    graph.replay()
    torch.cuda.synchronize()
    ok = (refused and torch.equal(replayed, eager) and gemm.tile_counters(device, 1).numel() > cached
          and not gemm.tile_counters(device, 1).any() and relative_error(eager, torch_gemm(qa, sa, w, s)) < 1e-2)
    return {"tiles": cached + 1, "refused_in_capture": refused, "ok": ok}


def sweep_tiles(backend: CudaBackend, shapes: list[Shape], copy_gbps: float, deadline: float) -> dict:
    """Each candidate at the M values of each range (SWEEP_M), until `deadline` (perf_counter seconds):
    per range and candidate the us summed over the weights and the worst weight's percent of copy."""
    print("\nsweep: decode tile (block_n/warps/stages x waves); us summed over the weights of both models")
    results: dict[str, dict] = {range_name: {} for range_name in SWEEP_M}
    for cand_name, tile, waves in CANDIDATES:
        if time.perf_counter() > deadline:
            print(f"  {cand_name}: skipped (past --budget-s)")
            continue
        configs = with_decode_tile(backend.configs, tile, waves)
        for range_name, m_values in SWEEP_M.items():
            per_shape, worst_error, worst_copy = {}, 0.0, 100.0
            for shape in shapes:
                for m in m_values:
                    worst_error = max(worst_error, shape.check(backend, configs, m)[0])
                    us = shape.time_us(backend, configs, m)
                    per_shape[f"{shape.model} {shape.name} M={m}"] = us
                    worst_copy = min(worst_copy, 100 * shape.weight_bytes / (us * 1e3) / copy_gbps)
            results[range_name][cand_name] = dict(
                total_us=sum(per_shape.values()), worst_copy_pct=worst_copy, worst_error=worst_error,
                block_n=tile.block_n, launch=tile.launch, waves=waves, per_shape=per_shape)
            print(f"  {range_name:<28} {cand_name:<14} {sum(per_shape.values()):8.1f} us, worst weight "
                  f"{worst_copy:3.0f}% of copy{'' if worst_error < 1e-2 else f'  WRONG (error {worst_error:.1e})'}")
    sweep = {}
    for range_name, candidates in results.items():
        valid = {name: r for name, r in candidates.items() if r["worst_error"] < 1e-2}
        if valid:
            best = min(valid, key=lambda name: valid[name]["total_us"])
            print(f"  {range_name}: best {best} ({valid[best]['total_us']:.1f} us)")
            sweep[range_name] = {"best": best, "candidates": candidates}
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--no-sweep", action="store_true", help="only the default tiles")
    parser.add_argument("--budget-s", type=float, default=75.0, help="start no sweep candidate past this")
    args = parser.parse_args()
    start = time.perf_counter()
    backend = CudaBackend()
    configs = backend.configs
    copy_gbps = measure_roofline(backend, size=4096, copy_bytes=1 << 30).copy_gbps
    print(f"{torch.cuda.get_device_name()}: {backend.num_sms} SMs, copy {copy_gbps:.0f} GB/s; "
          f"M=1 {configs.decode_gemm_tile(1)}, waves {configs.decode_waves}; "
          f"M=2-16 {configs.decode_gemm_tile(2)}")
    g = torch.Generator(backend.device).manual_seed(0)
    shapes = [Shape(backend, model, name, n, k, g) for model in ("deepseek-v3", "deepseek-v2-lite")
              for name, n, k in decode_weights(load_config(model))]

    rows, failures = [], []
    print(f"{'model':<17}{'weight':<15}{'N x K':>12} {'M':>3} {'splits':>6} {'us':>7} {'GB/s':>6} {'copy':>5} "
          f"{'error':>8}")
    for shape in shapes:
        model, name, n, k = shape.model, shape.name, shape.n, shape.k
        for m in M_VALUES:
            tile = configs.decode_gemm_tile(m)
            splits = gemm.choose_splits(1, -(-n // tile.block_n), -(-k // fp8.BLOCK), backend.num_sms,
                                        configs.decode_waves)
            error, same = shape.check(backend, configs, m)
            us = shape.time_us(backend, configs, m)
            gbps = shape.weight_bytes / (us * 1e-6) / 1e9
            row = dict(model=model, weight=name, n=n, k=k, m=m, splits=splits, weight_bytes=shape.weight_bytes,
                       time_us=us, gbps=gbps, copy_pct=100 * gbps / copy_gbps, error=error, deterministic=same)
            rows.append(row)
            if error > 1e-2 or not same:
                failures.append(f"{model} {name} M={m}: error {error:.2e}, repeatable {same}")
            print(f"{model:<17}{name:<15}{f'{n}x{k}':>12} {m:>3} {splits:>6} {us:7.2f} {gbps:6.0f} "
                  f"{row['copy_pct']:4.0f}% {error:8.1e}{'' if same else '  NOT REPEATABLE'}")
    capture = check_counters_grown_in_capture(backend)
    if not capture["ok"]:
        failures.append(f"counters too small inside a graph capture: {capture}")
    print(f"\ncounters too small inside a graph capture ({capture['tiles']} tiles): "
          f"{'ok' if capture['ok'] else 'FAILED'}")
    print("per M, over the weights of one layer (each weight once): total us, weight GB/s, % of copy, worst weight")
    summary = {}
    for model in ("deepseek-v3", "deepseek-v2-lite"):
        for m in M_VALUES:
            mine = [r for r in rows if r["model"] == model and r["m"] == m]
            total_us = sum(r["time_us"] for r in mine)
            total_bytes = sum(r["weight_bytes"] for r in mine)
            worst = min(mine, key=lambda r: r["copy_pct"])
            copy_pct = 100 * total_bytes / (total_us * 1e3) / copy_gbps
            summary[f"{model} M={m}"] = dict(time_us=total_us, copy_pct=copy_pct, worst=worst["weight"],
                                             worst_copy_pct=worst["copy_pct"])
            print(f"  {model:<17} M={m:<3} {total_us:7.1f} us {copy_pct:4.0f}% of copy; worst {worst['weight']} "
                  f"{worst['copy_pct']:.0f}%")
    below = sum(r["copy_pct"] < 75 for r in rows)
    print(f"{below} of {len(rows)} (weight, M) below 75% of copy bandwidth")

    sweep = {} if args.no_sweep else sweep_tiles(backend, shapes, copy_gbps, start + args.budget_s)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), num_sms=backend.num_sms, copy_gbps=copy_gbps,
                       rows=rows, summary=summary, capture_growth=capture, sweep=sweep, failures=failures,
                       seconds=time.perf_counter() - start), f, indent=1)
    print(f"\n{'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'} "
          f"({time.perf_counter() - start:.0f} s); wrote {args.json}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
