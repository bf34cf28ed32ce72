"""RMSNorm over the last dim, with the residual add fused and, optionally, the 1x128 FP8 quantization
of its result in the same kernel (the numerics of quant.py's quantize_activation, bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends import fp8
from dsv3.backends.triton_kernels.configs import TileConfig
from dsv3.backends.triton_kernels.quant import (
    BLOCK_K,
    block_scale,
    cast_rne,
    empty_scales,
    fp8_constants,
    quantize_tile,
)


@triton.jit
def _load_summed(x_ptr, r_ptr, row, stride_x, stride_r, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """The row's values at `cols`: x, or x + residual rounded to x's dtype."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = cast_rne(x.to(tl.float32) + residual.to(tl.float32), x.dtype)
    return x


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, K, eps, parts,
                     stride_x, stride_r, stride_out, stride_h, stride_q, stride_sm, stride_sg,
                     HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                     MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr, UE8M0: tl.constexpr,
                     ROW_GROUPS: tl.constexpr, GROUPS: tl.constexpr):
    """Program (row, part) normalizes the 128-column groups part*GROUPS.., stepping parts*GROUPS.

    Every program first reads the whole row as one [ROW_GROUPS, 128] tile for the sum of squares, so the
    sum (and the result) does not depend on `parts`; a row split over several programs at decode spreads
    the quantization's division and rounding over as many multiprocessors. With GROUPS >= ROW_GROUPS
    (one program a row, whole) the tile already read is the one normalized.
    """
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_K)[None, :]
    row_groups = tl.arange(0, ROW_GROUPS)
    row_cols = row_groups[:, None] * BLOCK_K + lanes
    x_row = _load_summed(x_ptr, r_ptr, row, stride_x, stride_r, row_cols, row_cols < K, HAS_RESIDUAL)
    xf = x_row.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / K + eps)
    if GROUPS >= ROW_GROUPS:
        _normalize_groups(x_row, row_groups, row_cols, rstd, row, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, K,
                          stride_out, stride_h, stride_q, stride_sm, stride_sg,
                          HAS_RESIDUAL, QUANT, FP8_MAX, MIN_NORMAL, NEG_ZERO, UE8M0)
    else:
        for first in range(tl.program_id(1) * GROUPS, tl.cdiv(K, BLOCK_K), parts * GROUPS):
            groups = first + tl.arange(0, GROUPS)
            cols = groups[:, None] * BLOCK_K + lanes
            x = _load_summed(x_ptr, r_ptr, row, stride_x, stride_r, cols, cols < K, HAS_RESIDUAL)
            _normalize_groups(x, groups, cols, rstd, row, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, K,
                              stride_out, stride_h, stride_q, stride_sm, stride_sg,
                              HAS_RESIDUAL, QUANT, FP8_MAX, MIN_NORMAL, NEG_ZERO, UE8M0)


@triton.jit
def _normalize_groups(x, groups, cols, rstd, row, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, K,
                      stride_out, stride_h, stride_q, stride_sm, stride_sg,
                      HAS_RESIDUAL: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                      MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr, UE8M0: tl.constexpr):
    """Store x + residual (h), the normalized x (out) and its FP8 copy with scales, for the 128-column
    `groups` of one row (x [G, 128] in the activation dtype at `cols`)."""
    mask = cols < K
    if HAS_RESIDUAL:
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(x.dtype)
    y = cast_rne(weight.to(tl.float32) * cast_rne(x.to(tl.float32) * rstd, x.dtype).to(tl.float32), x.dtype)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)
    if QUANT:
        yf = y.to(tl.float32)
        scale = block_scale(tl.max(tl.abs(yf), axis=1), FP8_MAX, UE8M0)
        q = quantize_tile(yf, scale, FP8_MAX, MIN_NORMAL, NEG_ZERO)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups * BLOCK_K < K)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
             config: TileConfig, quant: tuple[torch.dtype, float, bool] | None = None):
    """RMSNorm over the last dim (fp32 math, result in x's dtype), optionally adding a residual first
    and quantizing the result per 128 channels.

    Args:
        x: [M, K]; residual: [M, K] or None; weight: [K].
        config: block_n = columns per program, block_m = the most rows whose row is split over
            programs (every part reads the whole row for its sum, so this pays at few rows only); more
            rows: one program a row, the quantization done block_n columns at a time; launch keywords in
            config.launch.
        quant: (fp8 dtype, fp8 max, ue8m0) to also return the quantized result, else None.
    Returns:
        (out [M, K], h = x + residual or None, q [M, K] or None, scales [M, K/128] column-major or None).
    """
    m, k = x.shape
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    q = s = None
    if quant is not None:
        q = torch.empty((m, k), dtype=quant[0], device=x.device)
        s = empty_scales(m, k, x.device)
    if m == 0:
        return out, h, q, s
    row_groups = triton.next_power_of_2(triton.cdiv(k, fp8.BLOCK))
    parts = triton.cdiv(k, config.block_n) if m <= config.block_m else 1
    # a whole row without quantization is normalized as read (H100: 83 against 94 us for 4096 x 7168);
    # the quantization goes faster block_n columns at a time (125 against 144 us)
    groups = row_groups if parts == 1 and quant is None else config.block_n // fp8.BLOCK
    unused = out  # a pointer argument the kernel's constexpr flags never read still needs a tensor
    _rms_norm_kernel[(m, parts)](
        x, residual if residual is not None else unused, weight, out, h if h is not None else unused,
        q if q is not None else unused, s if s is not None else unused, k, float(eps), parts,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        h.stride(0) if h is not None else 0, q.stride(0) if q is not None else 0,
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        HAS_RESIDUAL=residual is not None, QUANT=quant is not None,
        FP8_MAX=float(quant[1]) if quant else 1.0,  # unread without QUANT
        **fp8_constants(quant[0] if quant else torch.float8_e4m3fn),
        UE8M0=bool(quant[2]) if quant else False,
        ROW_GROUPS=row_groups, GROUPS=groups, **config.launch)
    return out, h, q, s
