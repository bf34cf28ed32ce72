"""MLA decode over the FP8 latent cache against the BF16 cache (issue 21's "FP8 latent cache" target: at
least 1.5x faster at 32k context), on a GPU of the cuda or rocm backend.

For batch 1, 16 and 64, 16 and 128 heads (V3 under TP8, and whole), 8k and 32k tokens per sequence:
backend.mla_decode timed in graphs (dsv3.bench.common.time_op) with each cache, block tables rotated over
copies of the context so that the cache comes from memory, not L2. Printed per row: both times, their
ratio, and GB/s over the cache bytes read (656 or 1152 per token) as a percent of the copy bandwidth
measured first (bytes read + written, as dsv3 bench counts it). Under a minute on an H200.

Usage (repository root, on the GPU machine):
    python3 scripts/gpu_fp8_cache.py [--json fp8_cache.json]
or from Python: `from scripts.gpu_fp8_cache import fp8_cache_speedup; rows = fp8_cache_speedup()`.
"""

from __future__ import annotations

import argparse
import json

import torch
from dsv3.backends.interface import Backend, MLAInputs, PagedBatch, write_fp8_cache
from dsv3.backends.select import select

from dsv3.bench.common import time_op

RANK, ROPE, NOPE, VALUE = 512, 64, 128, 128
#: bytes of cache every timed pass reads at least (the H200's L2 is 50 MB)
ROTATE_BYTES = 512 << 20
MAX_SETS = 16


def copy_bandwidth(backend: Backend, num_bytes: int = 1 << 30) -> float:
    """GB/s of a device copy, bytes read plus written."""
    src = torch.randn(num_bytes // 2, device=backend.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = time_op(lambda: dst.copy_(src), [()], backend, graph=False)
    return 2 * num_bytes / (timing.median_ms * 1e-3) / 1e9


def _cache(backend: Backend, num_blocks: int, block_size: int, kv_cache_dtype: str, generator) -> torch.Tensor:
    """A pool of random tokens (never zeros), written through the cache's own quantization for fp8."""
    spec = backend.mla_cache_spec(num_blocks, block_size, RANK, ROPE, torch.bfloat16, kv_cache_dtype)
    cache = backend.allocate_mla_cache(spec)
    rows = num_blocks * block_size
    if spec.kind == "fp8_ds_mla":
        for start in range(0, rows, 1 << 18):
            chunk = torch.arange(start, min(rows, start + (1 << 18)), device=backend.device)
            write_fp8_cache(cache, chunk, torch.randn(len(chunk), RANK, device=backend.device,
                                                      generator=generator).bfloat16(),
                            torch.randn(len(chunk), ROPE, device=backend.device, generator=generator).bfloat16())
    else:
        cache.normal_(generator=generator)
    return cache


def time_decode(backend: Backend, batch: int, heads: int, context: int, kv_cache_dtype: str,
                block_size: int = 64) -> tuple[float, int]:
    """(median ms of one mla_decode call, cache bytes one call reads) at these dimensions."""
    device = backend.device
    g = torch.Generator(device).manual_seed(batch * heads + context)
    blocks_per_seq = -(-context // block_size)
    spec = backend.mla_cache_spec(1, block_size, RANK, ROPE, torch.bfloat16, kv_cache_dtype)
    read = batch * context * spec.bytes_per_token
    sets = max(1, min(MAX_SETS, -(-ROTATE_BYTES // read)))
    cache = _cache(backend, 1 + sets * batch * blocks_per_seq, block_size, kv_cache_dtype, g)
    order = 1 + torch.randperm(sets * batch * blocks_per_seq, device=device, generator=g).to(torch.int32)
    tables = order.view(sets, batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query_start = torch.arange(batch + 1, dtype=torch.int32, device=device)
    weights = backend.prepare_mla(torch.randn(heads * (NOPE + VALUE), RANK, device=device, generator=g) * RANK ** -0.5,
                                  heads, NOPE, VALUE, torch.bfloat16)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g).bfloat16()

    inputs = MLAInputs(rand(batch, heads, NOPE), rand(batch, heads, ROPE), rand(batch, RANK), rand(batch, ROPE))
    sets_args = [(PagedBatch(tables[s], seq_lens, query_start, 1, context),) for s in range(sets)]
    timing = time_op(lambda paged: backend.mla_decode(inputs, cache, paged, weights, 192 ** -0.5), sets_args,
                     backend)
    return timing.median_ms, read


def fp8_cache_speedup(batches=(1, 16, 64), heads=(16, 128), contexts=(8192, 32768), backend: Backend | None = None,
                      quiet: bool = False) -> list[dict]:
    """Decode with the BF16 and the FP8 latent cache at every (batch, heads, context); one dict per row
    (times in microseconds, speedup = BF16 time / FP8 time, pct_copy: cache bytes read per second as a
    percent of the copy bandwidth)."""
    backend = backend or select("auto")[0]
    copy_gbps = copy_bandwidth(backend)
    if not quiet:
        print(f"{backend.device_name()}: copy {copy_gbps:.0f} GB/s (read + written); backend "
              f"{backend.capabilities.name}; FP8 cache in {backend.capabilities.fp8_dtype}")
        print(f"{'batch':>5} {'heads':>5} {'context':>7} {'bf16 us':>9} {'fp8 us':>9} {'speedup':>7} "
              f"{'bf16 %copy':>10} {'fp8 %copy':>9}")
    rows = []
    for context in contexts:
        for head_count in heads:
            for batch in batches:
                row = dict(batch=batch, heads=head_count, context=context)
                for dtype in ("bf16", "fp8"):
                    ms, read = time_decode(backend, batch, head_count, context, dtype)
                    row[f"{dtype}_us"] = ms * 1e3
                    row[f"{dtype}_pct_copy"] = 100 * read / (ms * 1e-3) / 1e9 / copy_gbps
                    torch.cuda.empty_cache()
                row["speedup"] = row["bf16_us"] / row["fp8_us"]
                rows.append(row)
                if not quiet:
                    print(f"{batch:>5} {head_count:>5} {context:>7} {row['bf16_us']:>9.1f} {row['fp8_us']:>9.1f} "
                          f"{row['speedup']:>6.2f}x {row['bf16_pct_copy']:>9.0f}% {row['fp8_pct_copy']:>8.0f}%",
                          flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = fp8_cache_speedup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
