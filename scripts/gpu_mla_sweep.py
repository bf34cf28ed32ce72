"""MLA decode at the small batches of issue 21: the op kernel by kernel, its split and tile policy swept.

For each case (heads, batch, context) it times, in CUDA-graph replays over rotating random pools:
  - the tree's `mla_decode` with its default policy, over the BF16 cache and the FP8 latent cache;
  - with --before FILE, that file's `mla_decode` (an older backends/triton_kernels/mla.py) the same way;
  - the tree's kernel under every DecodeConfig of the sweep (tile, warps, stages, programs per SM,
    shortest split) and every FUSED_COMBINE_MAX_SPLITS of --fused;
and profiles the default's replay kernel by kernel. Bytes are the cache bytes read; copy bandwidth is
measured in the same run. Usage (repository root, on the GPU machine):
    python3 scripts/gpu_mla_sweep.py [--before .whl/mla_before.py] [--json FILE] [--budget 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import sys
import time

import torch
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import mla

from dsv3.bench import harness
from dsv3.bench.common import measure_roofline, rotation_count, time_op
from dsv3.bench.mla import SOFTMAX_SCALE, _decode_inputs, _weights, cache_bytes_per_token

CASES = [(16, 1, 8192), (16, 1, 32768), (128, 1, 4096), (16, 1, 1024), (128, 64, 32768), (16, 4, 32768),
         (16, 64, 4096)]
FP8_CASES = {(16, 64, 4096), (16, 1, 32768), (16, 4, 32768), (128, 1, 4096), (128, 64, 32768)}


def sweep_configs(heads: int) -> list[mla.DecodeConfig]:
    """The DecodeConfigs tried at `heads` query heads."""
    block_h = 16 if heads <= 16 else 64
    tiles = [(32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3)] if heads <= 16 else [(64, 8, 2), (32, 8, 2)]
    return [mla.DecodeConfig(block_h, block_n, num_warps=warps, num_stages=stages, programs_per_sm=per_sm,
                             min_split_tokens=min_split)
            for (block_n, warps, stages), per_sm, min_split in itertools.product(tiles, (1, 2, 4), (64, 128, 256))]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("mla_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="an older mla.py to time beside the tree's")
    parser.add_argument("--fused", type=int, nargs="+", default=[4, 16],
                        help="FUSED_COMBINE_MAX_SPLITS values to sweep")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds to spend at most")
    parser.add_argument("--fp8-only", action="store_true", help="time the FP8 latent cache alone")
    parser.add_argument("--cases", help="only these cases: heads,batch,context;...")
    parser.add_argument("--ir-dir", help="write each compiled partial kernel's TTGIR here")
    parser.add_argument("--json")
    args = parser.parse_args()
    started = time.monotonic()
    backend = CudaBackend()
    device = backend.device
    copy_gbps = measure_roofline(backend).copy_gbps
    before = load_module(args.before) if args.before else None
    print(f"copy {copy_gbps:.0f} GB/s", flush=True)
    results = []
    default_fused = mla.FUSED_COMBINE_MAX_SPLITS
    cases = [tuple(map(int, case.split(","))) for case in args.cases.split(";")] if args.cases else CASES
    for heads, batch, context in cases:
        if time.monotonic() - started > args.budget:
            print("budget spent", flush=True)
            break
        generator = torch.Generator(device).manual_seed(heads + batch + context)
        weights = _weights(backend, heads, device, generator)
        row = {"heads": heads, "batch": batch, "context": context}
        dtypes = ("bf16", "fp8") if (heads, batch, context) in FP8_CASES else ("bf16",)
        for cache_dtype in ("fp8",) if args.fp8_only else dtypes:
            cache_bytes = batch * context * cache_bytes_per_token(backend, cache_dtype)
            sets = [_decode_inputs(batch, heads, context, device, generator, backend, cache_dtype)
                    for _ in range(rotation_count(cache_bytes))]

            def timed(fn, sets=sets):
                return time_op(fn, sets, backend, target_ms=30).median_ms * 1e3

            def percent(us, cache_bytes=cache_bytes):
                return round(100 * cache_bytes / (us * 1e-6) / (copy_gbps * 1e9), 1)

            config = None  # the tree's default for the cache
            tree_us = timed(lambda i, p, b: mla.mla_decode(i, p, b, weights, SOFTMAX_SCALE, config=config))
            row[cache_dtype] = {"tree_us": round(tree_us, 1), "tree_copy_pct": percent(tree_us)}
            if before is not None:
                before_us = timed(lambda i, p, b: before.mla_decode(i, p, b, weights, SOFTMAX_SCALE,
                                                                     config=before.default_decode_config(
                                                                         heads, torch.bfloat16)))
                row[cache_dtype]["before_us"] = round(before_us, 1)
            if cache_dtype == "bf16":
                inputs = sets[0]
                replay = backend.graph_runner(
                    lambda: mla.mla_decode(*inputs, weights, SOFTMAX_SCALE))
                row["profile"] = harness.profile_step(replay, top=8)["rows"]
            swept = []
            for fused in args.fused if cache_dtype == "bf16" else [default_fused]:
                mla.FUSED_COMBINE_MAX_SPLITS = fused
                for candidate in sweep_configs(heads):
                    if time.monotonic() - started > args.budget:
                        break
                    try:
                        us = timed(lambda i, p, b, c=candidate: mla.mla_decode(i, p, b, weights, SOFTMAX_SCALE,
                                                                               config=c))
                    except Exception as error:  # a tile that does not fit (shared memory) is skipped, and said
                        print(f"    {candidate}: {type(error).__name__}: {str(error)[:120]}", flush=True)
                        continue
                    swept.append((us, fused, candidate))
            mla.FUSED_COMBINE_MAX_SPLITS = default_fused
            swept.sort(key=lambda item: item[0])
            row[cache_dtype]["best"] = [
                {"us": round(us, 1), "copy_pct": percent(us), "fused": fused,
                 **{k: v for k, v in dataclasses.asdict(c).items() if k != "launch"}}
                for us, fused, c in swept[:5]]
            del sets
            line = row[cache_dtype]
            best = line["best"][0] if line["best"] else {}
            print(f"H={heads} B={batch} S={context} {cache_dtype}: tree {line['tree_us']} us "
                  f"({line['tree_copy_pct']}% copy), before {line.get('before_us')} us; best {best}", flush=True)
        for prof in row.get("profile", []):
            print(f"    {prof['us_per_step']:8.1f} us {prof['calls_per_step']:4.1f}x  {prof['name'][:90]}")
        results.append(row)
    compiled = inspect_kernels(args.ir_dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "cases": results, "compiled": compiled}, f, indent=1)


def inspect_kernels(ir_dir: str | None) -> list[dict]:
    """Registers, spills, shared memory and the IR's async copies of every compiled partial kernel."""
    rows = []
    for caches in mla._decode_partial_kernel.device_caches.values():
        for index, kernel in enumerate(caches[0].values()):
            kernel._init_handles()
            meta = kernel.metadata
            ttgir = kernel.asm.get("ttgir", "")
            row = {"num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
                   "n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                   "async_copies": ttgir.count("async_copy_global_to_local"),
                   "wgmma": ttgir.count("warp_group_dot"), "dots": ttgir.count("tt.dot")}
            rows.append(row)
            print("compiled:", row, flush=True)
            if ir_dir:
                with open(f"{ir_dir}/partial_{index}.ttgir", "w") as f:
                    f.write(ttgir)
    return rows


if __name__ == "__main__":
    main()
