"""Rows per program and warps of the 1x128 activation quantization, timed on the GPU in CUDA graphs.

Usage (repository root, on the GPU machine): python3 scripts/gpu_quant_sweep.py
"""

from __future__ import annotations

import torch
from dsv3.backends.triton_kernels import quant
from dsv3.backends.triton_kernels.configs import TileConfig

from scripts.gpu_decode_gemm_sweep import graph_time_us as rotating_graph_time_us

SHAPES = ((1, 7168), (64, 7168), (4096, 7168), (4096, 18432), (4096, 2048))


def graph_time_us(fn, reps: int = 20) -> float:
    """Per-call time of fn() over reps calls in one CUDA graph (the median of five replays)."""
    return rotating_graph_time_us(lambda _: fn(), 1, reps)


def main() -> None:
    tiles = [(rows, warps) for rows in (4, 8, 16, 32) for warps in (4, 8)]
    print("M x K".rjust(12), *(f"{r}r/{w}w".rjust(9) for r, w in tiles), "GB/s (best)")
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        times = [graph_time_us(lambda r=r, w=w: quant.quantize_activation(
            x, torch.float8_e4m3fn, 448.0, False, TileConfig(r, 128, 1, {"num_warps": w}))) for r, w in tiles]
        best = min(times)
        print(f"{m:>5}x{k:<6}", *(f"{t:9.2f}" for t in times), f"{m * k * 3.0 / best / 1e3:8.0f}")


if __name__ == "__main__":
    main()
