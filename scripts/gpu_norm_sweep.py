"""RMSNorm followed by the 1x128 activation quantization, timed on the GPU in CUDA graphs: the two
kernels one after the other against the norm that quantizes in the same kernel, per columns per
program and warps, with the row split over programs and not.

Usage (repository root, on the GPU machine): python3 scripts/gpu_norm_sweep.py
"""

from __future__ import annotations

from dataclasses import replace

import torch
from dsv3.backends.triton_kernels import norm, quant
from dsv3.backends.triton_kernels.configs import NVIDIA_SM90, TileConfig

from scripts.gpu_quant_sweep import graph_time_us

FP8 = (torch.float8_e4m3fn, 448.0, False)
SHAPES = ((1, 7168, True), (1, 1536, False), (4, 7168, True), (16, 7168, True), (64, 7168, True),
          (128, 7168, True), (512, 7168, True), (4096, 7168, True), (4096, 1536, False))
FUSED = [(cols, warps, split) for cols in (512, 1024, 2048) for warps in (4, 8) for split in (True, False)]


def two_kernels(x, w, residual, norm: TileConfig):
    out, _, _, _ = norm.rms_norm(x, w, 1e-6, residual, norm)
    return quant.quantize_activation(out, *FP8, NVIDIA_SM90.quant_tile(x.shape[0]))


def main() -> None:
    print("fused: columns per program / warps / s(plit row) or w(hole row per program)")
    print("M x K".rjust(12), "2 kernels".rjust(10), *(f"{c}/{w}/{'s' if s else 'w'}".rjust(10) for c, w, s in FUSED))
    for m, k, with_residual in SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        residual = torch.randn(m, k, device="cuda").to(torch.bfloat16) if with_residual else None
        w = torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5
        # the fused result must be the two kernels' bit for bit, whatever the tile
        out, _, q, s = norm.rms_norm(x, w, 1e-6, residual, NVIDIA_SM90.norm, FP8)
        eq, es = quant.quantize_activation(out, *FP8, NVIDIA_SM90.quant)
        assert torch.equal(q.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s, es), (m, k)
        times = [graph_time_us(lambda: two_kernels(x, w, residual, NVIDIA_SM90.norm))]
        for cols, warps, split in FUSED:
            tile = TileConfig(1 << 20 if split else 0, cols, 1, {"num_warps": warps})
            times.append(graph_time_us(lambda t=tile: norm.rms_norm(x, w, 1e-6, residual, t, FP8)))
        print(f"{m:>5}x{k:<6}", *(f"{t:10.2f}" for t in times))
    # the norm alone: the config's split row against one program a row
    print("norm alone, config / one program a row")
    for m, k, with_residual in SHAPES:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        residual = torch.randn(m, k, device="cuda").to(torch.bfloat16) if with_residual else None
        w = torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5
        whole = replace(NVIDIA_SM90.norm, block_m=0)
        times = [graph_time_us(lambda t=t: norm.rms_norm(x, w, 1e-6, residual, t)) for t in (NVIDIA_SM90.norm, whole)]
        print(f"{m:>5}x{k:<6}", *(f"{t:10.2f}" for t in times))


if __name__ == "__main__":
    main()
