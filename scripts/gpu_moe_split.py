"""Split-K in the grouped MoE GEMMs (backends/triton_kernels/moe.py) at decode, on an NVIDIA GPU.

Per model (DeepSeek-V3: 256 experts top-8, hidden 7168, expert inter 2048; V2-Lite: 64 top-6, 2048,
1408), FP8 experts and N = 1-64 tokens: `moe_experts` timed in CUDA graphs (dsv3.bench.common.time_op,
routings rotated so that the experts' weights come from memory) with the split it chooses from the SM
count and with num_splits=1, then with a few forced splits (the best is what configs.decode_waves
should aim at). GB/s over the bytes of the experts hit (weights and scales, each read once) and
percent of the copy bandwidth measured in the same run. Checks: the split output against the unsplit
one (they differ only by the order of fp32 sums) and a second split call against the first, bit for bit.

Usage (repository root, on the GPU machine):
    python3 scripts/gpu_moe_split.py
"""

from __future__ import annotations

import argparse

import torch
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import moe

from dsv3.bench.common import measure_roofline, time_op
from dsv3.bench.moe import random_fp8_bytes

#: (name, experts, top-k, hidden, expert inter)
MODELS = (("V3", 256, 8, 7168, 2048), ("V2-Lite", 64, 6, 2048, 1408))
TOKENS = (1, 2, 4, 8, 16, 64)
FORCED = (2, 4, 8)
ROUTINGS = 8  # distinct routings rotated through: V2-Lite's 6 experts alone are about the L2's size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    args = parser.parse_args()
    backend = CudaBackend()
    copy_gbps = measure_roofline(backend, size=4096, copy_bytes=1 << 29).copy_gbps
    print(f"{torch.cuda.get_device_name()}: {backend.num_sms} SMs, copy {copy_gbps:.0f} GB/s, "
          f"decode_waves {backend.configs.decode_waves}; us per moe_experts call in CUDA graphs")
    failures: list[str] = []
    for model in MODELS:
        time_model(*model, args.tokens, backend, copy_gbps, failures)
    print("\n" + ("\n".join("FAILED " + f for f in failures) if failures else "all checks passed"))


def time_model(name: str, num_experts: int, top_k: int, hidden: int, inter: int, token_counts: list[int],
               backend: CudaBackend, copy_gbps: float, failures: list[str]) -> None:
    """One model's table: per token count, unsplit, chosen and forced splits; failed checks appended."""
    dev, configs, num_sms = backend.device, backend.configs, backend.num_sms
    g = torch.Generator(dev).manual_seed(0)
    gate_up = random_fp8_bytes((num_experts, 2 * inter, hidden), dev, g)
    down = random_fp8_bytes((num_experts, hidden, inter), dev, g)
    gate_up_scale = torch.rand(num_experts, 2 * inter // 128, hidden // 128, device=dev, generator=g) * 2e-3 + 1e-3
    down_scale = torch.rand(num_experts, hidden // 128, inter // 128, device=dev, generator=g) * 2e-3 + 1e-3
    bytes_per_expert = 3 * hidden * inter + 4 * (gate_up_scale[0].numel() + down_scale[0].numel())

    def call(x, weights, ids, sms=None, splits=None):
        return moe.moe_experts(x, weights, ids, gate_up, gate_up_scale, down, down_scale, configs,
                               quant=(448.0, False), num_sms=sms, num_splits=splits)

    print(f"\n{name}: {num_experts} experts top-{top_k}, hidden {hidden}, inter {inter}")
    print(f"{'N':>3} {'splits':>6} {'unsplit us':>10} {'split us':>9} {'speedup':>7} {'GB/s':>6} {'% copy':>6} "
          + " ".join(f"{f'x{s} us':>7}" for s in FORCED) + f" {'rel err':>8}")
    for tokens in token_counts:
        sets = []
        for _ in range(ROUTINGS):
            ids = torch.rand(tokens, num_experts, device=dev, generator=g).topk(top_k, dim=-1).indices
            weights = torch.rand(tokens, top_k, device=dev, generator=g) + 0.1
            sets.append((torch.randn(tokens, hidden, device=dev, generator=g, dtype=torch.bfloat16), weights, ids))
        hit_bytes = sum(int(ids.unique().numel()) for _, _, ids in sets) / ROUTINGS * bytes_per_expert
        chosen = _chosen_splits(tokens, num_experts, top_k, hidden, inter, configs, num_sms)
        unsplit_us = time_op(lambda *a: call(*a, splits=1), sets, backend).median_ms * 1e3
        split_us = time_op(lambda *a: call(*a, sms=num_sms), sets, backend).median_ms * 1e3
        forced = [time_op(lambda *a, s=s: call(*a, splits=s), sets, backend).median_ms * 1e3 for s in FORCED]
        x, weights, ids = sets[0]
        unsplit, split = call(x, weights, ids, splits=1).float(), call(x, weights, ids, sms=num_sms).float()
        again = call(x, weights, ids, sms=num_sms).float()
        error = ((split - unsplit).norm() / unsplit.norm()).item()
        if error > 1e-2 or not torch.equal(split, again):
            failures.append(f"{name} N={tokens}: rel err {error:.2e}, repeat equal {torch.equal(split, again)}")
        gbps = hit_bytes / (split_us * 1e-6) / 1e9
        print(f"{tokens:>3} {chosen:>6} {unsplit_us:10.1f} {split_us:9.1f} {unsplit_us / split_us:7.2f} "
              f"{gbps:6.0f} {100 * gbps / copy_gbps:6.1f} " + " ".join(f"{t:7.1f}" for t in forced)
              + f" {error:8.1e}", flush=True)


def _chosen_splits(tokens, num_experts, top_k, hidden, inter, configs, num_sms) -> str:
    """The splits moe_experts picks for gate_up and down, as "gate_up/down"."""
    tile = configs.moe_prefill if tokens * top_k / num_experts >= configs.moe_prefill_min_rows else configs.moe_decode
    pairs = tokens * top_k
    tiles = min(moe._max_rows(pairs, num_experts, tile.block_m) // tile.block_m, pairs)
    gate_up = moe._splits(tiles * -(-inter // 128), -(-hidden // 128), configs, num_sms, None)[1]
    down = moe._splits(tiles * -(-hidden // tile.block_n), -(-inter // 128), configs, num_sms, None)[1]
    return f"{gate_up}/{down}"


if __name__ == "__main__":
    main()
