"""The MoE alignment kernel (`align_by_expert`, backends/triton_kernels/moe.py) on one NVIDIA GPU, against
the torch ops it replaced (`align_by_expert_reference`), at DeepSeek-V3's routing (256 experts, top-8).

1. Equality, bit for bit, from 2 to 16384 tokens with the block_m of sm_90's moe_decode and moe_prefill
   tiles: router-like routings (distinct top-8), random experts (repeats within a token), one expert for all.
2. The alignment's time, old and new, eager and replayed from a CUDA graph, at the block_m moe_experts picks.
3. The whole moe_experts (FP8, hidden 7168, expert inter 2048), old alignment and new, eager and graph; and
   the largest row error between their outputs (the atomic combine adds in any order: not bit for bit).

Exits 1 on any inequality. About 30 s on an H200, most of it compiling.
Usage (repository root, on the GPU machine): python3 scripts/gpu_moe_align.py
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import moe
from dsv3.backends.triton_kernels.configs import kernel_configs

from dsv3.bench.common import time_op
from dsv3.bench.moe import HIDDEN, INTER, NUM_EXPERTS, TOP_K, make_routing, random_fp8_bytes
from dsv3.conformance.checks import row_error

EQUALITY_TOKENS = (2, 3, 16, 64, 127, 128, 129, 512, 1000, 2048, 4096, 8192, 16384)
ALIGN_TOKENS = (2, 16, 64, 128, 512, 2048, 4096, 16384)
MOE_TOKENS = (1, 16, 64, 128, 4096)
new_align_by_expert = moe.align_by_expert  # the kernel, whatever moe_experts is given below


def old_align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment before the kernel: the one-token path as it is, the torch ops from 2 tokens on."""
    if ids.shape[0] == 1:
        return new_align_by_expert(ids, num_experts, block_m)
    return moe.align_by_expert_reference(ids, num_experts, block_m)


@contextmanager
def old_alignment():
    """moe_experts with the old alignment while inside."""
    kernel = moe.align_by_expert
    moe.align_by_expert = old_align_by_expert
    try:
        yield
    finally:
        moe.align_by_expert = kernel


def routings(tokens: int, device, generator) -> dict[str, torch.Tensor]:
    return {"top_k": make_routing(tokens, device, generator)[1],
            "random": torch.randint(0, NUM_EXPERTS, (tokens, TOP_K), device=device, generator=generator),
            "one_expert": torch.full((tokens, TOP_K), NUM_EXPERTS - 1, device=device)}


def check_equality(block_sizes: tuple[int, ...], device, generator) -> list[str]:
    failures = []
    for tokens in EQUALITY_TOKENS:
        for pattern, ids in routings(tokens, device, generator).items():
            for block_m in block_sizes:
                got = new_align_by_expert(ids, NUM_EXPERTS, block_m)
                expected = moe.align_by_expert_reference(ids, NUM_EXPERTS, block_m)
                if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
                    failures.append(f"N={tokens} {pattern} block_m={block_m}")
    return failures


def main() -> None:
    backend = CudaBackend()
    device = backend.device
    g = torch.Generator(device).manual_seed(0)
    configs = kernel_configs("sm_90")
    decode_m, prefill_m = configs.moe_decode.block_m, configs.moe_prefill.block_m
    print(f"{torch.cuda.get_device_name()}: {NUM_EXPERTS} experts top-{TOP_K}, block_m {decode_m} (decode) "
          f"and {prefill_m} (prefill)")

    failures = check_equality((decode_m, prefill_m), device, g)
    print(f"equality at N = {', '.join(map(str, EQUALITY_TOKENS))}: "
          + ("all equal" if not failures else f"{len(failures)} differ: {'; '.join(failures[:8])}"), flush=True)

    def block_m_of(tokens: int) -> int:  # the tile moe_experts picks
        return prefill_m if tokens * TOP_K / NUM_EXPERTS >= configs.moe_prefill_min_rows else decode_m

    print(f"\nalign_by_expert, ms per call (three rotating routings)\n{'N':>6} {'block_m':>7} "
          f"{'old eager':>10} {'new eager':>10} {'old graph':>10} {'new graph':>10}")
    for tokens in ALIGN_TOKENS:
        block_m = block_m_of(tokens)
        sets = [(make_routing(tokens, device, g)[1], NUM_EXPERTS, block_m) for _ in range(3)]
        times = [time_op(fn, sets, backend, graph=graph, target_ms=20).median_ms
                 for graph in (False, True) for fn in (old_align_by_expert, new_align_by_expert)]
        print(f"{tokens:>6} {block_m:>7} " + " ".join(f"{t:10.4f}" for t in times), flush=True)

    gate_up = random_fp8_bytes((NUM_EXPERTS, 2 * INTER, HIDDEN), device, g)
    down = random_fp8_bytes((NUM_EXPERTS, HIDDEN, INTER), device, g)
    gate_up_scale = torch.rand(NUM_EXPERTS, 2 * INTER // 128, HIDDEN // 128, device=device, generator=g) * 2e-3 + 1e-3
    down_scale = torch.rand(NUM_EXPERTS, HIDDEN // 128, INTER // 128, device=device, generator=g) * 2e-3 + 1e-3

    def run(x, weights, ids):
        return moe.moe_experts(x, weights, ids, gate_up, gate_up_scale, down, down_scale, configs,
                               quant=(448.0, False))

    print(f"\nmoe_experts (FP8, D={HIDDEN}, I={INTER}), ms per call\n{'N':>6} {'old eager':>10} {'new eager':>10} "
          f"{'old graph':>10} {'new graph':>10} {'row error':>10}")
    for tokens in MOE_TOKENS:
        sets = [(torch.randn(tokens, HIDDEN, device=device, generator=g, dtype=torch.bfloat16),
                 *make_routing(tokens, device, g)) for _ in range(3)]
        times = []
        for graph in (False, True):
            with old_alignment():
                times.append(time_op(run, sets, backend, graph=graph, target_ms=30).median_ms)
            times.append(time_op(run, sets, backend, graph=graph, target_ms=30).median_ms)
        with old_alignment():
            old = run(*sets[0])
        error = row_error(run(*sets[0]).float(), old.float())
        print(f"{tokens:>6} " + " ".join(f"{t:10.3f}" for t in times) + f" {error:10.2e}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
