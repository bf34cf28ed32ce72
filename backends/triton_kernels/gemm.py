"""FP8 block-scaled GEMM: C = A @ B^T with 1x128 activation scales and 128x128 weight scales.

A [M, K] FP8 with scales [M, ceil(K/128)]; B [N, K] FP8 with scales
[ceil(N/128), ceil(K/128)]. Each 128-wide K block is one FP8 dot accumulated in
fp32, multiplied by a_scale (per row) and b_scale (per 128 output columns) and
added to an fp32 accumulator: the block math of backends/fp8, for any M, N, K
(a partial last block in N or K is masked).

One kernel, one launch, serves both regimes. Prefill (large M) tiles the output
and walks all of K. Decode (M <= 64) is bound by reading B once: the M rows fit
one tile, so to put every multiprocessor to work the K blocks are split among
`num_splits` programs per output tile (split-K). Each split writes its fp32
partial tile to a workspace and takes a ticket from the tile's counter; the
program that draws the last ticket sums the partials in split order (so the
result does not depend on which program finished last), stores the output and
sets the counter back to zero for the next call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError
from dsv3.backends.triton_kernels.configs import KernelConfigs, TileConfig
from dsv3.backends.triton_kernels.quant import BLOCK_K, cast_rne

#: fewest K blocks choose_splits leaves a split: a split of one block writes and reads back a partial
#: tile of the same order of bytes as the weight block it read
MIN_SPLIT_BLOCKS = 2
#: tile counters allocated at first use on a device (grown to the next power of two past it when a call
#: has more output tiles)
MIN_TILE_COUNTERS = 4096


@triton.jit
def _load_partial(ptrs, mask, present):
    """A split's partial tile, read from L2; zeros for a split past the last (`present` False)."""
    return tl.load(ptrs, mask=tl.where(present, mask, False), other=0.0, cache_modifier=".cg")


@triton.jit
def take_ticket(counter_ptr):
    """A split's ticket, once its partial is stored: the barrier puts every thread's store before the
    ticket, whose release makes them visible to the program that draws the last one."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel")


@triton.jit
def sum_partials(ptrs, mask, stride_ps, num_splits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The splits' partial tiles (split stride stride_ps) added from zero in split order, as a separate sum
    kernel would, read from L2 after the last ticket's acquire (.cg: another SM's stores are not in this
    one's L1). Four loads are in flight at a time; a split past the last adds 0.0, which leaves the sum's
    bits as they are (starting from +0.0, the sum is never -0.0)."""
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, num_splits, 4):
        p0 = _load_partial(ptrs, mask, True)
        p1 = _load_partial(ptrs + stride_ps, mask, first + 1 < num_splits)
        p2 = _load_partial(ptrs + 2 * stride_ps, mask, first + 2 < num_splits)
        p3 = _load_partial(ptrs + 3 * stride_ps, mask, first + 3 < num_splits)
        total = total + p0 + p1 + p2 + p3
        ptrs += 4 * stride_ps
    return total


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, partial_ptr, counter_ptr, M, N, K,
                     k_blocks_per_split, num_splits, stride_am, stride_bn, stride_ps, stride_cm, stride_asm, stride_asg,
                     stride_bsn, stride_bsg,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrapped rows and columns are computed and dropped at the store: loads need no mask
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * k_blocks_per_split
    k_end = tl.minimum(k_start + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + (k_start * BLOCK_K + offs_k)[None, :]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + (k_start * BLOCK_K + offs_k)[:, None]
    a_scale_ptrs = a_scale_ptr + rows * stride_asm
    b_scale_ptrs = b_scale_ptr + (cols // BLOCK_K) * stride_bsn

    # The block-scaled K loop; moe.py's down kernel has its own copy, specialised deliberately: an
    # expert's weight offset, the BF16 variant and scales loaded a block ahead would slow this one.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(k_start, k_end):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = kb * BLOCK_K + offs_k < K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kb * stride_asg)
        b_scale = tl.load(b_scale_ptrs + kb * stride_bsg)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    offs_c = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K:  # the partials are [num_splits, M, N] fp32; the last ticket's program sums them
        partial_ptrs = partial_ptr + offs_c
        tl.store(partial_ptrs + split.to(tl.int64) * stride_ps, acc, mask=mask)
        if take_ticket(counter_ptr + pid) == num_splits - 1:
            total = sum_partials(partial_ptrs, mask, stride_ps, num_splits, BLOCK_M, BLOCK_N)
            tl.store(c_ptr + offs_c, cast_rne(total, c_ptr.dtype.element_ty), mask=mask)
            tl.store(counter_ptr + pid, 0)
    else:
        tl.store(c_ptr + offs_c, cast_rne(acc, c_ptr.dtype.element_ty), mask=mask)


def choose_splits(m_tiles: int, n_tiles: int, k_blocks: int, num_sms: int, waves: float = 2.0,
                  min_blocks: int = MIN_SPLIT_BLOCKS) -> int:
    """K splits so that the output tiles times the splits give about `waves` programs per SM.

    Every split gets ceil(k_blocks / splits) K blocks and the last what is left; none gets fewer than
    `min_blocks` (its partial tile would cost about as much to write and read back as its weight to
    read), so K of fewer than 2 * min_blocks blocks is not split, and where the last split would come
    out short each split takes one more block.
    """
    tiles = m_tiles * n_tiles
    splits = max(1, min(k_blocks // min_blocks, round(waves * num_sms / tiles)))
    per_split = triton.cdiv(k_blocks, splits)
    while 0 < k_blocks % per_split < min_blocks and per_split < k_blocks:
        per_split += 1
    return triton.cdiv(k_blocks, per_split)


def decode_tile(m: int, config: TileConfig) -> int:
    """The M tile of the decode kernel: the smallest power of two >= m, at least config.block_m."""
    return max(config.block_m, triton.next_power_of_2(m))


_tile_counters: dict[torch.device, torch.Tensor] = {}
#: counters replaced by larger ones: a CUDA graph recorded with them still uses them, so they stay allocated
_outgrown_counters: list[torch.Tensor] = []


def tile_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """The split-K tickets: int32 zeros, at least `num_tiles` of them, that every call leaves zeroed.

    One buffer per device, allocated once and kept (calls on a device must not overlap in time: the
    backends run their GEMMs on one stream at a time). A call with more tiles than it holds gets a
    larger one, except while a CUDA graph is being captured, which must not allocate what outlives it:
    that is an error (graph_runner runs a step before recording it, which sizes the buffer).
    """
    counters = _tile_counters.get(device)
    if counters is not None and counters.numel() >= num_tiles:
        return counters
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        have = 0 if counters is None else counters.numel()
        raise BackendError(f"split-K GEMM: {num_tiles} tile counters needed while a CUDA graph is being "
                           f"captured, {have} allocated; run the call once before recording it")
    if counters is not None:
        _outgrown_counters.append(counters)
    counters = torch.zeros(max(MIN_TILE_COUNTERS, triton.next_power_of_2(num_tiles)), dtype=torch.int32,
                           device=device)
    _tile_counters[device] = counters
    return counters


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype, configs: KernelConfigs, num_sms: int,
             num_splits: int | None = None, tile: TileConfig | None = None) -> torch.Tensor:
    """C [M, N] = (A, a_scale) @ (B, b_scale)^T with FP8 block scaling, in one launch.

    Args:
        a: [M, K] FP8, unit stride along K; a_scale: float32 [M, ceil(K/128)] (any strides).
        b: [N, K] FP8 of the same dtype, unit stride along K; b_scale: float32 [ceil(N/128), ceil(K/128)].
        out_dtype: result dtype (bf16, fp16 or fp32).
        configs: the arch's kernel table; M <= configs.decode_max_m takes the split-K decode tiles.
        num_sms: multiprocessors (compute units) of the device, to size the split.
        num_splits, tile: override the split and the tile (tuning and tests).
    Returns:
        [M, N] in out_dtype; with any split, bitwise the fp32 partials summed in split order and rounded once.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != b.dtype:
        raise TypeError(f"fp8_gemm: A is {a.dtype} but B is {b.dtype}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    k_blocks = triton.cdiv(k, fp8.BLOCK)
    decode = m <= configs.decode_max_m
    if tile is None:
        tile = configs.decode_gemm_tile(m) if decode else configs.gemm_prefill
        if decode:
            tile = TileConfig(decode_tile(m, tile), tile.block_n, 1, tile.launch)
    m_tiles, n_tiles = triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n)
    if num_splits is None:
        num_splits = choose_splits(m_tiles, n_tiles, k_blocks, num_sms, configs.decode_waves) if decode else 1
    per_split = triton.cdiv(k_blocks, num_splits)
    num_splits = triton.cdiv(k_blocks, per_split)
    split_k = num_splits > 1
    unused = c  # a pointer argument the kernel's constexpr flags never read still needs a tensor
    partials = torch.empty((num_splits, m, n), dtype=torch.float32, device=a.device) if split_k else unused
    counters = tile_counters(a.device, m_tiles * n_tiles) if split_k else unused
    _fp8_gemm_kernel[(m_tiles * n_tiles, num_splits)](
        a, a_scale, b, b_scale, c, partials, counters, m, n, k, per_split, num_splits,
        a.stride(0), b.stride(0), m * n, n, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, GROUP_M=tile.group_m, EVEN_K=k % fp8.BLOCK == 0,
        SPLIT_K=split_k, **tile.launch)
    return c
