"""Tiles, pipeline depth and split count of the split-K decode GEMM on V3's weights, timed on the GPU
in CUDA graphs, against the copy-rate floor of each weight. Prints the best settings per shape and M.

Usage (repository root, on the GPU machine): python3 scripts/gpu_decode_gemm_sweep.py [--m 1 16] [--few]
(--few: 16 settings instead of 36, for a sweep over more M)
"""

from __future__ import annotations

import argparse
import itertools

import torch
from dsv3.backends import fp8
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import gemm
from dsv3.backends.triton_kernels.configs import TileConfig

from dsv3.bench.common import measure_roofline

#: (N, K): fused q_a+kv_a, q_b, o_proj, dense gate+up, dense down, shared gate+up, shared down
SHAPES = ((2112, 7168), (24576, 1536), (7168, 16384), (36864, 7168), (7168, 18432), (4096, 7168), (7168, 2048))


def graph_time_us(fn, copies: int, reps: int = 24) -> float:
    """Per-call time of fn(i) over reps calls in one graph, cycling through `copies` weight copies (so
    that the weights, as in a real step, come from memory rather than from the 50 MB L2)."""
    fn(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % copies)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows of the activation (default 1 16)")
    parser.add_argument("--few", action="store_true", help="block_n 64/128, 4/8 warps, 3/4 stages, waves 2/4")
    args = parser.parse_args()
    backend = CudaBackend()
    copy = measure_roofline("cuda", torch.float8_e4m3fn, size=4096, copy_bytes=1 << 30).copy_gbps
    defaults = ", ".join(f"M={m} {backend.configs.decode_gemm_tile(m)}" for m in args.m)
    print(f"copy {copy:.0f} GB/s; default: {defaults}")
    if args.few:
        options = list(itertools.product((64, 128), (4, 8), (3, 4), (2.0, 4.0)))
    else:
        options = list(itertools.product((64, 128), (4, 8), (3, 4, 6), (1.0, 2.0, 4.0)))
    total_default = total_best = 0.0
    by_setting: dict[tuple, float] = {}  # (m, block_n, warps, stages, waves) -> time summed over the shapes
    default_by_m: dict[int, float] = {}
    for n, k in SHAPES:
        w, s = fp8.quantize_blocks(torch.randn(n, k, device="cuda") / k ** 0.5)
        floor_us = (w.numel() + s.numel() * 4) / copy / 1e3
        copies = max(1, -(-(200 << 20) // w.numel()))
        weights = [(w.clone(), s.clone()) for _ in range(copies)]
        for m in args.m:
            qa, sa = backend.quantize_activation(torch.randn(m, k, device="cuda").to(torch.bfloat16))
            results = []
            for block_n, warps, stages, waves in options:
                tile = TileConfig(16, block_n, 1, {"num_warps": warps, "num_stages": stages})
                splits = gemm.choose_splits(1, -(-n // block_n), -(-k // 128), backend.num_sms, waves)
                try:
                    t = graph_time_us(lambda i: gemm.fp8_gemm(qa, sa, *weights[i], torch.bfloat16, backend.configs,
                                                              backend.num_sms, num_splits=splits, tile=tile), copies)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  {block_n}/{warps}w/{stages}s/{waves}x: {type(e).__name__}")
                    continue
                results.append((t, block_n, warps, stages, waves, splits))
                key = (m, block_n, warps, stages, waves)
                by_setting[key] = by_setting.get(key, 0.0) + t
            now = graph_time_us(lambda i: gemm.fp8_gemm(qa, sa, *weights[i], torch.bfloat16, backend.configs,
                                                        backend.num_sms), copies)
            best = min(results)
            total_default, total_best = total_default + now, total_best + best[0]
            default_by_m[m] = default_by_m.get(m, 0.0) + now
            print(f"{n:>6}x{k:<6} M={m:<3} floor {floor_us:6.1f} us  default {now:6.1f} us "
                  f"({floor_us / now:4.0%})  best {best[0]:6.1f} us ({floor_us / best[0]:4.0%}): "
                  f"block_n {best[1]}, {best[2]} warps, {best[3]} stages, waves {best[4]} ({best[5]} splits)")
            for row in sorted(results)[1:4]:
                print(f"{'':>26} next {row[0]:6.1f} us: block_n {row[1]}, {row[2]} warps, {row[3]} stages, "
                      f"waves {row[4]}")
    print(f"sum over shapes and M: default {total_default:.1f} us, best per shape {total_best:.1f} us")
    for m in args.m:  # one setting for every shape at this M: the best few by their sum over the shapes
        ranked = sorted((t, key[1:]) for key, t in by_setting.items() if key[0] == m)[:3]
        print(f"M={m}: default {default_by_m[m]:.1f} us over the shapes; one setting for all: "
              + "; ".join(f"{t:.1f} us (block_n {b}, {w} warps, {st} stages, waves {wv})"
                          for t, (b, w, st, wv) in ranked))


if __name__ == "__main__":
    main()
