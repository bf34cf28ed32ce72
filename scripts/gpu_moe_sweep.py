"""Tile sweep of the grouped MoE kernels (backends/triton_kernels/moe.py) on one GPU.

Times `moe_experts` (routing sort, gate/up + SwiGLU + quantization, down + combine) with each tile
override at DeepSeek-V3's expert shapes (256 experts, top-8, hidden 7168, expert inter 2048, FP8),
in CUDA graphs over three rotating routings. One TileConfig drives both kernels: block_m and the
launch settings for both, block_n for the down GEMM (gate/up always takes 128 columns).

Usage (repository root, on the GPU machine): python3 scripts/gpu_moe_sweep.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels.configs import TileConfig, kernel_configs
from dsv3.backends.triton_kernels.moe import moe_experts

from dsv3.bench.common import time_op
from dsv3.bench.moe import HIDDEN, INTER, NUM_EXPERTS, TOP_K, make_routing, random_fp8_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    backend = CudaBackend()
    dev = backend.device
    g = torch.Generator(dev).manual_seed(0)
    configs = kernel_configs("sm_90")
    gate_up = random_fp8_bytes((NUM_EXPERTS, 2 * INTER, HIDDEN), dev, g)
    down = random_fp8_bytes((NUM_EXPERTS, HIDDEN, INTER), dev, g)
    gate_up_scale = torch.rand(NUM_EXPERTS, 2 * INTER // 128, HIDDEN // 128, device=dev, generator=g) * 2e-3 + 1e-3
    down_scale = torch.rand(NUM_EXPERTS, HIDDEN // 128, INTER // 128, device=dev, generator=g) * 2e-3 + 1e-3
    sets = []
    for _ in range(3):
        weights, ids = make_routing(args.tokens, dev, g)
        sets.append((torch.randn(args.tokens, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16), weights, ids))
    flops = 6.0 * args.tokens * TOP_K * HIDDEN * INTER
    print(f"{torch.cuda.get_device_name()}: {args.tokens} tokens, 256 experts top-8, FP8")
    print(f"{'block_m':>7} {'block_n':>7} {'warps':>5} {'stages':>6} {'ms':>8} {'TFLOPS':>7}")
    for block_m, block_n, warps, stages in itertools.product((64, 128), (128, 256), (4, 8), (3, 4, 5)):
        tile = TileConfig(block_m, block_n, 8, {"num_warps": warps, "num_stages": stages})
        run = lambda x, w, i: moe_experts(x, w, i, gate_up, gate_up_scale, down, down_scale,  # noqa: E731
                                          configs, quant=(448.0, False), tile=tile)
        try:
            ms = time_op(run, sets, backend, target_ms=60).median_ms
        except Exception as error:  # a tile that does not fit the shared memory
            print(f"{block_m:>7} {block_n:>7} {warps:>5} {stages:>6}  failed: {str(error).splitlines()[0][:80]}")
            continue
        print(f"{block_m:>7} {block_n:>7} {warps:>5} {stages:>6} {ms:8.3f} {flops / ms / 1e9:7.0f}", flush=True)


if __name__ == "__main__":
    main()
