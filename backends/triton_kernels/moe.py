"""Grouped MoE: tokens sorted by expert, two grouped GEMMs, a weighted combine.

    out[n] = sum_j weights[n, j] * down_e(silu(gate_e(x_n)) * up_e(x_n)),  e = ids[n, j]

1. `align_by_expert` (one launch in decode, two in prefill; no host sync, fixed
   sizes): the N*k (token, choice) pairs are sorted by expert, stably, and each
   expert's run is padded to a multiple of BLOCK_M, so that every row tile
   belongs to one expert. The grid covers the most tiles any routing can need;
   tiles past the end are marked with expert = E and exit at once. The op can
   therefore be captured in a CUDA graph. A pair whose expert id is -1 is
   skipped: it gets no row, so the GEMMs never run it (the expert-parallel
   exchange marks other ranks' pairs so). `align_by_expert_reference` spells
   the same in torch ops.
2. `_gate_up_kernel`: per (tile, 128 columns of I), the gate and up rows of the
   tile's expert times the tile's tokens (gathered from x), SwiGLU in the
   epilogue, and in FP8 mode the 1x128 quantization of the result too (the
   tile holds whole 128-wide blocks), written in sorted order.
3. `_down_kernel`: per (tile, BLOCK_N columns of D), the down projection, times
   each pair's routing weight, atomically added (fp32) to its token's row.

FP8 mode uses block scales (1x128 activations, 128x128 weights) as the dense
GEMM does; the BF16 variant runs the same kernels without scales. Rounding
follows the reference backend: gate/up and the down output are rounded to the
activation dtype, silu and the product too, before the next step.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from dsv3.backends import fp8
from dsv3.backends.triton_kernels.configs import KernelConfigs, TileConfig
from dsv3.backends.triton_kernels.quant import BLOCK_K, block_scale, cast_rne, fp8_constants, quantize_tile

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


ALIGN_CHUNK = 1024  # the most pairs aligned in one launch; above, a chunk of this many per program
ALIGN_SUB = 128  # pairs ranked at once: a [SUB, SUB] comparison
ALIGN_CELLS = 4096  # tiles x experts compared at once


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (token, choice) pairs by expert, each expert's run padded to a multiple of block_m.

    Stable: within an expert, pairs keep their order. Pairs of expert -1 are left out: no row holds
    them and no tile runs for them (the sizes stay those of every pair). Bit-identical to `align_by_expert_reference`
    (which spells it in torch ops). One launch up to ALIGN_CHUNK pairs (decode: every program counts
    all pairs); above, two: a count per chunk of ALIGN_CHUNK pairs, then the placement. No host sync.

    Args:
        ids: [N, k] int64 expert of each choice, or -1 to skip it.
        num_experts: E.
        block_m: rows per tile.
    Returns:
        sorted_pairs: int32 [max_rows]: pair index n*k + j in expert order; padding rows hold N*k.
        tile_expert: int32 [max_rows / block_m]: each tile's expert, E past the last used tile (with one
            token, a tile per choice: -1 for a skipped one).
    """
    if ids.shape[0] == 1:  # one token (batch-1 decode): a tile per choice, no sort
        return _one_token_pairs(ids.shape[1], block_m, ids.device), ids.flatten().to(torch.int32)
    flat = ids.flatten().contiguous()  # flatten can return a strided view (of ids[:, ::2], say)
    num_pairs = flat.numel()
    max_rows = _max_rows(num_pairs, num_experts, block_m)
    num_tiles = max_rows // block_m
    device = ids.device
    sorted_pairs = torch.empty(max_rows, dtype=torch.int32, device=device)
    tile_expert = torch.empty(num_tiles, dtype=torch.int32, device=device)
    experts_pad = triton.next_power_of_2(num_experts)
    all_pad = triton.next_power_of_2(num_pairs)
    counted = all_pad > ALIGN_CHUNK
    chunk = ALIGN_CHUNK if counted else min(ALIGN_SUB, all_pad)
    num_chunks = triton.cdiv(num_pairs, chunk)
    block_m_pad = triton.next_power_of_2(block_m)
    tiles = max(1, min(ALIGN_CELLS // block_m_pad, ALIGN_CELLS // experts_pad))
    programs = max(num_chunks, triton.cdiv(num_tiles, tiles))
    offsets = torch.empty((programs, experts_pad), dtype=torch.int32, device=device)
    counts = offsets  # read only when counted
    if counted:
        counts = torch.empty((num_chunks, experts_pad), dtype=torch.int32, device=device)
        _count_kernel[(num_chunks,)](flat, counts, num_pairs, E_PAD=experts_pad, CHUNK=chunk)
    _place_kernel[(programs,)](
        flat, counts, offsets, sorted_pairs, tile_expert, num_pairs, num_experts, num_chunks, num_tiles,
        triton.cdiv(num_tiles, programs), E_PAD=experts_pad, CHUNK=chunk, SUB=min(ALIGN_SUB, chunk),
        COUNTED=counted, ALL_PAD=1 if counted else all_pad, COUNT_ROWS=max(1, ALIGN_CELLS // experts_pad),
        BLOCK_M=block_m, BLOCK_M_PAD=block_m_pad, TILES=tiles)
    return sorted_pairs, tile_expert


def _max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the sorted order that any routing fits in: every pair, and up to block_m - 1 padding
    rows for each expert that can be used."""
    used = min(num_experts, num_pairs)
    return triton.cdiv(num_pairs + used * (block_m - 1), block_m) * block_m


def align_by_expert_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`align_by_expert` in torch ops (a stable argsort and about 15 launches): the specification the
    kernel is tested against (tests/kernels/test_moe_align.py). N >= 2."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    max_rows = _max_rows(num_pairs, num_experts, block_m)
    expert = torch.where(flat >= 0, flat, num_experts)  # skipped pairs: a last expert E whose rows are dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, expert, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(expert, stable=True)
    expert_of_sorted = expert[order]
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[expert_of_sorted]
    dest = (padded_end - padded)[expert_of_sorted] + rank
    dest = torch.where(expert_of_sorted < num_experts, dest, max_rows)  # into a scratch row past the end
    sorted_pairs = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = order.to(torch.int32)
    sorted_pairs = sorted_pairs[:max_rows]
    padded_end = padded_end[:num_experts]
    tile_start = torch.arange(0, max_rows, block_m, device=ids.device)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)
    return sorted_pairs, tile_expert


@triton.jit
def _histogram(experts, valid, E_PAD: tl.constexpr):
    """Pairs per expert among the valid ones (a skipped pair, expert -1, is not valid)."""
    valid = valid & (experts >= 0)
    hist = tl.histogram(tl.where(valid, experts, 0), E_PAD)
    num_invalid = tl.sum((valid == 0).to(tl.int32))
    return hist - tl.where(tl.arange(0, E_PAD) == 0, num_invalid, 0)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, counts_ptr, num_pairs, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """counts[chunk, e]: the pairs of this program's chunk routed to expert e."""
    chunk = tl.program_id(0)
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = pair < num_pairs
    experts = tl.load(ids_ptr + pair, mask=valid, other=0).to(tl.int32)
    tl.store(counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), _histogram(experts, valid, E_PAD))


# sizes are not specialised on (divisible by 16 or not): one compile per power of two of the pairs
@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "num_tiles", "tiles_per_program"])
def _place_kernel(ids_ptr, counts_ptr, offsets_ptr, sorted_pairs_ptr, tile_expert_ptr,
                  num_pairs, num_experts, num_chunks, num_tiles, tiles_per_program,
                  E_PAD: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, COUNTED: tl.constexpr,
                  ALL_PAD: tl.constexpr, COUNT_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_M_PAD: tl.constexpr, TILES: tl.constexpr):
    """The rows of this program's chunk of CHUNK pairs (programs past the last chunk have none), then
    its share of the tiles: their expert, and the sentinel in their padding rows. Every row is
    written once.

    A pair's row = its expert's padded start + the pairs of that expert in earlier chunks + those
    earlier in this chunk. Per-expert totals and earlier chunks come from the counts table (COUNTED)
    or from counting all pairs here (ALL_PAD >= their number); within the chunk, SUB pairs at a
    time, a running count per expert plus the rank among the same expert's pairs of the SUB.
    """
    program = tl.program_id(0)
    first_pair = program * CHUNK
    expert_ids = tl.arange(0, E_PAD)
    if COUNTED:
        total = tl.zeros((E_PAD,), dtype=tl.int32)
        before = tl.zeros((E_PAD,), dtype=tl.int32)
        for row0 in range(0, num_chunks, COUNT_ROWS):
            rows = (row0 + tl.arange(0, COUNT_ROWS))[:, None]
            counts = tl.load(counts_ptr + rows * E_PAD + expert_ids[None, :], mask=rows < num_chunks, other=0)
            total += tl.sum(counts, axis=0)
            before += tl.sum(tl.where(rows < program, counts, 0), axis=0)
    else:
        every_pair = tl.arange(0, ALL_PAD)
        their_experts = tl.load(ids_ptr + every_pair, mask=every_pair < num_pairs, other=0).to(tl.int32)
        total = _histogram(their_experts, every_pair < num_pairs, E_PAD)
        before = _histogram(their_experts, (every_pair < num_pairs) & (every_pair < first_pair), E_PAD)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded

    # the pairs: the next row of each expert lives in offsets[program], where each pair looks its own up
    next_row = padded_start + before
    offsets = offsets_ptr + program * E_PAD
    lane = tl.arange(0, SUB)
    earlier = lane[None, :] < lane[:, None]  # [i, j]: j comes before i
    for sub in range(first_pair, tl.minimum(first_pair + CHUNK, num_pairs), SUB):
        pair = sub + lane
        valid = pair < num_pairs
        experts = tl.load(ids_ptr + pair, mask=valid, other=0).to(tl.int32)
        valid = valid & (experts >= 0)  # a skipped pair gets no row
        tl.store(offsets + expert_ids, next_row)
        tl.debug_barrier()
        rank = tl.sum(((experts[None, :] == experts[:, None]) & earlier).to(tl.int32), axis=1)
        row = tl.load(offsets + experts, mask=valid, other=0) + rank
        tl.store(sorted_pairs_ptr + row, pair, mask=valid)
        next_row += _histogram(experts, valid, E_PAD)
        tl.debug_barrier()  # every load of this SUB before the next store to offsets

    # the tiles: tile t's expert is how many experts end at or before its first row (E past the end);
    # of its rows, those past its expert's pairs hold the sentinel num_pairs
    real = expert_ids[None, :] < num_experts
    tile_lo = program * tiles_per_program
    tile_hi = tl.minimum(tile_lo + tiles_per_program, num_tiles)
    lane_m = tl.arange(0, BLOCK_M_PAD)[None, :]
    for tile0 in range(tile_lo, tile_hi, TILES):
        tiles = tile0 + tl.arange(0, TILES)
        tile_ok = tiles < tile_hi
        first = (tiles * BLOCK_M)[:, None]
        tl.store(tile_expert_ptr + tiles, tl.sum((real & (padded_end[None, :] <= first)).to(tl.int32), axis=1),
                 mask=tile_ok)
        inside = real & (padded_start[None, :] <= first) & (first < padded_end[None, :])
        pairs_left = tl.minimum(tl.maximum(padded_start[None, :] + total[None, :] - first, 0), BLOCK_M)
        filled = tl.sum(tl.where(inside, pairs_left, 0), axis=1)[:, None]
        padding = (lane_m >= filled) & (lane_m < BLOCK_M) & tile_ok[:, None]
        tl.store(sorted_pairs_ptr + first + lane_m, tl.zeros((TILES, BLOCK_M_PAD), tl.int32) + num_pairs,
                 mask=padding)


_ONE_TOKEN_PAIRS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _one_token_pairs(top_k: int, block_m: int, device: torch.device) -> torch.Tensor:
    """sorted_pairs of one token: tile j holds choice j in its first row, padding rows the sentinel top_k.

    Made once per shape and device (so a recorded decode step launches nothing for it). Correct
    for any ids; without a sort two choices of one expert would read its weights twice, which
    top-k choices (distinct experts) never do.
    """
    key = (top_k, block_m, device)
    if key not in _ONE_TOKEN_PAIRS:
        pairs = torch.full((top_k, block_m), top_k, dtype=torch.int32)
        pairs[:, 0] = torch.arange(top_k, dtype=torch.int32)
        _ONE_TOKEN_PAIRS[key] = pairs.flatten().to(device)
    return _ONE_TOKEN_PAIRS[key]


@triton.jit
def _dot(a, b, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile_rows(tile_expert_ptr, sorted_pairs_ptr, num_pairs, num_experts, K, BLOCK_M: tl.constexpr):
    """This program's row tile: (expert, K blocks to run, rows, tile_used, pair of each row, valid rows).

    A tile past the last used one (expert == num_experts) or of a skipped choice (-1, one token) gets no
    K blocks and tile_used all False, so it loops zero times and stores nothing; its expert is clamped so
    that addresses stay in bounds.
    """
    tile_expert = tl.load(tile_expert_ptr + tl.program_id(0)).to(tl.int64)
    used = (tile_expert >= 0) & (tile_expert < num_experts)
    expert = tl.where(used, tile_expert, 0)
    k_blocks = tl.where(used, tl.cdiv(K, BLOCK_K), 0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_used = (tl.zeros((BLOCK_M,), dtype=tl.int32) + used.to(tl.int32)) != 0  # [BLOCK_M], all alike
    pair = tl.load(sorted_pairs_ptr + rows)
    valid = (pair < num_pairs) & tile_used
    return expert, k_blocks, rows, tile_used, pair, valid


@triton.jit
def _swiglu_store(acc_gate, acc_up, h_ptr, h_scale_ptr, rows, offs_n, n_ok, tile_used, pid_n,
                  stride_hm, stride_hsm, stride_hsg, FP8: tl.constexpr, ACT_DTYPE: tl.constexpr,
                  FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr, UE8M0: tl.constexpr):
    """gate_up's epilogue: SwiGLU of the fp32 sums, in FP8 mode quantized 1x128, stored in sorted order."""
    gate = cast_rne(acc_gate, ACT_DTYPE).to(tl.float32)
    up = cast_rne(acc_up, ACT_DTYPE).to(tl.float32)
    silu = cast_rne(gate / (1.0 + tl.exp(-gate)), ACT_DTYPE).to(tl.float32)
    hidden = cast_rne(silu * up, ACT_DTYPE).to(tl.float32)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    # padding rows of a used tile are written too (as zeros)
    if FP8:
        scale = block_scale(tl.max(tl.abs(hidden), axis=1), FP8_MAX, UE8M0)
        q = quantize_tile(hidden, scale, FP8_MAX, MIN_NORMAL, NEG_ZERO)
        tl.store(h_ptrs, q.to(h_ptr.dtype.element_ty), mask=tile_used[:, None])
        tl.store(h_scale_ptr + rows * stride_hsm + pid_n * stride_hsg, scale, mask=tile_used)
    else:
        tl.store(h_ptrs, hidden.to(h_ptr.dtype.element_ty), mask=n_ok[None, :] & tile_used[:, None])


@triton.jit
def _gate_up_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, h_ptr, h_scale_ptr, sorted_pairs_ptr, tile_expert_ptr,
                    num_pairs, num_experts, top_k, K, I,  # noqa: E741 - the paper's name
                    stride_xm, stride_xsm, stride_xsg, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsg,
                    stride_hm, stride_hsm, stride_hsg,
                    FP8: tl.constexpr, ACT_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr,
                    NEG_ZERO: tl.constexpr, UE8M0: tl.constexpr, IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(1)
    expert, k_blocks, rows, tile_used, pair, valid = _tile_rows(
        tile_expert_ptr, sorted_pairs_ptr, num_pairs, num_experts, K, BLOCK_M)
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    cols = offs_n % I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    a_scale_ptrs = x_scale_ptr + token * stride_xsm
    gate_scale_ptr = w_scale_ptr + expert * stride_wse + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn
    up_scale_ptr = w_scale_ptr + expert * stride_wse + ((I + pid_n * BLOCK_N) // BLOCK_K) * stride_wsn
    last_kb = tl.cdiv(K, BLOCK_K) - 1
    if FP8:  # the first K block's scales; each iteration loads the next block's (see _down_kernel)
        a_scale_next = tl.load(a_scale_ptrs)
        gate_scale_next = tl.load(gate_scale_ptr)
        up_scale_next = tl.load(up_scale_ptr)

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = kb * BLOCK_K + offs_k < K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            a_scale, gate_scale, up_scale = a_scale_next, gate_scale_next, up_scale_next
            kb_next = tl.minimum(kb + 1, last_kb)
            a_scale_next = tl.load(a_scale_ptrs + kb_next * stride_xsg)
            gate_scale_next = tl.load(gate_scale_ptr + kb_next * stride_wsg)
            up_scale_next = tl.load(up_scale_ptr + kb_next * stride_wsg)
            acc_gate += _dot(a, g, IEEE_FP32) * (a_scale * gate_scale)[:, None]
            acc_up += _dot(a, u, IEEE_FP32) * (a_scale * up_scale)[:, None]
        else:
            acc_gate += _dot(a, g, IEEE_FP32)
            acc_up += _dot(a, u, IEEE_FP32)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    _swiglu_store(acc_gate, acc_up, h_ptr, h_scale_ptr, rows, offs_n, n_ok, tile_used, pid_n,
                  stride_hm, stride_hsm, stride_hsg, FP8, ACT_DTYPE, FP8_MAX, MIN_NORMAL, NEG_ZERO, UE8M0)


@triton.jit
def _combine(acc, out_ptr, routing_ptr, pair, valid, offs_n, mask, top_k, stride_om, ACT_DTYPE: tl.constexpr):
    """down's epilogue: each row rounded to the activation dtype, times its routing weight, added to its token."""
    weight = tl.load(routing_ptr + pair, mask=valid, other=0.0)
    y = cast_rne(acc, ACT_DTYPE).to(tl.float32) * weight[:, None]
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
    tl.atomic_add(out_ptr + token[:, None] * stride_om + offs_n[None, :], y, mask=mask, sem="relaxed")


@triton.jit
def _down_kernel(h_ptr, h_scale_ptr, w_ptr, w_scale_ptr, out_ptr, routing_ptr, sorted_pairs_ptr, tile_expert_ptr,
                 num_pairs, num_experts, top_k, K, N,
                 stride_hm, stride_hsm, stride_hsg, stride_we, stride_wn, stride_wse, stride_wsn, stride_wsg,
                 stride_om,
                 FP8: tl.constexpr, ACT_DTYPE: tl.constexpr, IEEE_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(1)
    expert, k_blocks, rows, tile_used, pair, valid = _tile_rows(
        tile_expert_ptr, sorted_pairs_ptr, num_pairs, num_experts, K, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    a_scale_ptrs = h_scale_ptr + rows * stride_hsm
    b_scale_ptrs = w_scale_ptr + expert * stride_wse + (cols // BLOCK_K) * stride_wsn
    last_kb = tl.cdiv(K, BLOCK_K) - 1
    # Scales are plain loads, which Triton does not pipeline: each iteration loads the next K block's
    # (the last one reloads its own), so their latency hides behind this block's dot (2-4% at prefill).
    if FP8:
        a_scale_next = tl.load(a_scale_ptrs)
        b_scale_next = tl.load(b_scale_ptrs)

    # gemm.py's block-scaled K loop, specialised deliberately for the experts (see there)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = kb * BLOCK_K + offs_k < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            a_scale, b_scale = a_scale_next, b_scale_next
            kb_next = tl.minimum(kb + 1, last_kb)
            a_scale_next = tl.load(a_scale_ptrs + kb_next * stride_hsg)
            b_scale_next = tl.load(b_scale_ptrs + kb_next * stride_wsg)
            acc += _dot(a, b, IEEE_FP32) * a_scale[:, None] * b_scale[None, :]
        else:
            acc += _dot(a, b, IEEE_FP32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    mask = valid[:, None] & (offs_n[None, :] < N)
    _combine(acc, out_ptr, routing_ptr, pair, valid, offs_n, mask, top_k, stride_om, ACT_DTYPE)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                gate_up_scale: torch.Tensor | None, down: torch.Tensor, down_scale: torch.Tensor | None,
                configs: KernelConfigs, quant: tuple[float, bool] | None = None,
                tile: TileConfig | None = None,
                quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts' output for every token.

    Args:
        x: [N, D] activations (bf16, fp16 or fp32).
        weights: [N, k] float32 routing weights; ids: [N, k] int64 experts, -1 for a pair to skip (no
            rows, its weight unread).
        gate_up: [E, 2I, D] (gate rows, then up rows); down: [E, D, I]; FP8 with their
            block scales [E, 2I/128, D/128] and [E, D/128, I/128], or dense with None.
        configs: the arch's kernel table (moe_decode or moe_prefill by rows per expert).
        quant: (fp8 max, ue8m0) of the activation quantization; required with FP8 weights.
        tile: override the tile config (tuning and tests); block_n of the gate/up GEMM is always 128.
        quantized: x already quantized as `quant` says (FP8 [N, D], scales [N, D/128]), from a fused op.
    Returns:
        [N, D] in x's dtype.
    """
    from dsv3.backends.triton_kernels.quant import quantize_activation

    n_tokens, hidden = x.shape
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    top_k = ids.shape[1]
    is_fp8 = gate_up_scale is not None
    out = torch.zeros((n_tokens, hidden), dtype=torch.float32, device=x.device)
    if n_tokens == 0:
        return out.to(x.dtype)
    if tile is None:
        rows_per_expert = n_tokens * top_k / num_experts
        tile = configs.moe_prefill if rows_per_expert >= configs.moe_prefill_min_rows else configs.moe_decode
    if not is_fp8:
        stages = min(tile.launch.get("num_stages", 2), configs.moe_dense_max_stages)
        tile = tile.with_launch(num_stages=stages)
    block_m = tile.block_m
    sorted_pairs, tile_expert = align_by_expert(ids, num_experts, block_m)
    max_rows = sorted_pairs.numel()
    act_dtype = _TL_DTYPES[x.dtype]
    ieee = gate_up.dtype == torch.float32 or (not is_fp8 and _interpreting())
    x = x.contiguous()
    if is_fp8:
        if quant is None:
            raise ValueError("moe_experts: FP8 experts need quant=(fp8_max, ue8m0)")
        fp8_max, ue8m0 = quant
        if quantized is None:
            quantized = quantize_activation(x, gate_up.dtype, fp8_max, ue8m0, configs.quant_tile(n_tokens))
        x_in, x_scale = quantized
        h = torch.empty((max_rows, inter), dtype=gate_up.dtype, device=x.device)
        h_scale = torch.empty((max_rows, triton.cdiv(inter, fp8.BLOCK)), dtype=torch.float32, device=x.device)
        w1_scale, w2_scale = gate_up_scale, down_scale
        constants = fp8_constants(gate_up.dtype)
    else:
        fp8_max, ue8m0, constants = 1.0, False, fp8_constants(torch.float8_e4m3fn)  # unread without FP8
        x_in = x.to(gate_up.dtype)
        x_scale = h_scale = w1_scale = w2_scale = out  # unused placeholders
        h = torch.empty((max_rows, inter), dtype=gate_up.dtype, device=x.device)
    s = lambda t, d: t.stride(d) if is_fp8 else 0  # noqa: E731
    num_tiles = max_rows // block_m
    num_pairs = ids.numel()
    _gate_up_kernel[(num_tiles, triton.cdiv(inter, fp8.BLOCK))](
        x_in, x_scale, gate_up, w1_scale, h, h_scale, sorted_pairs, tile_expert,
        num_pairs, num_experts, top_k, hidden, inter,
        x_in.stride(0), s(x_scale, 0), s(x_scale, 1), gate_up.stride(0), gate_up.stride(1),
        s(w1_scale, 0), s(w1_scale, 1), s(w1_scale, 2), h.stride(0), s(h_scale, 0), s(h_scale, 1),
        FP8=is_fp8, ACT_DTYPE=act_dtype, FP8_MAX=float(fp8_max), **constants, UE8M0=bool(ue8m0),
        IEEE_FP32=ieee, EVEN_K=hidden % fp8.BLOCK == 0, BLOCK_M=block_m, BLOCK_N=fp8.BLOCK, **tile.launch)
    routing = weights.to(torch.float32).contiguous()
    _down_kernel[(num_tiles, triton.cdiv(hidden, tile.block_n))](
        h, h_scale, down, w2_scale, out, routing, sorted_pairs, tile_expert,
        num_pairs, num_experts, top_k, inter, hidden,
        h.stride(0), s(h_scale, 0), s(h_scale, 1), down.stride(0), down.stride(1),
        s(w2_scale, 0), s(w2_scale, 1), s(w2_scale, 2), out.stride(0),
        FP8=is_fp8, ACT_DTYPE=act_dtype, IEEE_FP32=ieee, EVEN_K=inter % fp8.BLOCK == 0,
        BLOCK_M=block_m, BLOCK_N=tile.block_n, **tile.launch)
    return out.to(x.dtype)

