"""FP8 block-scaled GEMM: C = A @ B^T with 1x128 activation scales and 128x128 weight scales.

A [M, K] FP8 with scales [M, ceil(K/128)]; B [N, K] FP8 with scales
[ceil(N/128), ceil(K/128)]. Each 128-wide K block is one FP8 dot accumulated in
fp32, multiplied by a_scale (per row) and b_scale (per 128 output columns) and
added to an fp32 accumulator: the block math of backends/fp8, for any M, N, K
(a partial last block in N or K is masked).

One kernel serves both regimes. Prefill (large M) tiles the output and walks
all of K. Decode (M <= 64) is bound by reading B once: the M rows fit one tile,
so to put every multiprocessor to work the K blocks are split among
`num_splits` programs per output tile (split-K); each writes an fp32 partial
and a second small kernel sums them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends.triton_kernels.configs import KernelConfigs, TileConfig
from dsv3.backends.triton_kernels.quant import cast_rne

SCALE_BLOCK = 128  # K block of the scales, in Python
BLOCK_K = tl.constexpr(SCALE_BLOCK)  # the same, inside the kernels


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, M, N, K, k_blocks_per_split,
                     stride_am, stride_bn, stride_cs, stride_cm, stride_asm, stride_asg, stride_bsn, stride_bsg,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
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

    c_ptrs = c_ptr + split * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, c_ptr, num_elements, NUM_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        total += tl.load(partial_ptr + s * num_elements + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, cast_rne(total, c_ptr.dtype.element_ty), mask=mask)


def choose_splits(m_tiles: int, n_tiles: int, k_blocks: int, num_sms: int, waves: float = 2.0) -> int:
    """K splits so that the output tiles times the splits give about `waves` programs per SM, no split empty."""
    tiles = m_tiles * n_tiles
    splits = max(1, min(k_blocks, round(waves * num_sms / tiles)))
    per_split = triton.cdiv(k_blocks, splits)
    return triton.cdiv(k_blocks, per_split)


def decode_tile(m: int, config: TileConfig) -> int:
    """The M tile of the decode kernel: the smallest power of two >= m, at least config.block_m."""
    return max(config.block_m, triton.next_power_of_2(m))


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype, configs: KernelConfigs, num_sms: int,
             num_splits: int | None = None, tile: TileConfig | None = None) -> torch.Tensor:
    """C [M, N] = (A, a_scale) @ (B, b_scale)^T with FP8 block scaling.

    Args:
        a: [M, K] FP8, unit stride along K; a_scale: float32 [M, ceil(K/128)] (any strides).
        b: [N, K] FP8 of the same dtype, unit stride along K; b_scale: float32 [ceil(N/128), ceil(K/128)].
        out_dtype: result dtype (bf16, fp16 or fp32).
        configs: the arch's kernel table; M <= configs.decode_max_m takes the split-K decode tiles.
        num_sms: multiprocessors (compute units) of the device, to size the split.
        num_splits, tile: override the split and the tile (tuning and tests).
    Returns:
        [M, N] in out_dtype.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != b.dtype:
        raise TypeError(f"fp8_gemm: A is {a.dtype} but B is {b.dtype}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    k_blocks = triton.cdiv(k, SCALE_BLOCK)
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
    target = c if num_splits == 1 else torch.empty((num_splits, m, n), dtype=torch.float32, device=a.device)
    _fp8_gemm_kernel[(m_tiles * n_tiles, num_splits)](
        a, a_scale, b, b_scale, target, m, n, k, per_split,
        a.stride(0), b.stride(0), target.stride(0) if num_splits > 1 else 0, n,
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, GROUP_M=tile.group_m, EVEN_K=k % SCALE_BLOCK == 0,
        **tile.launch)
    if num_splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, c, m * n, NUM_SPLITS=num_splits, BLOCK=block,
                                                         num_warps=4)
    return c
