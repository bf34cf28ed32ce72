"""Activation quantization per token per 128 channels, alone or fused with RMSNorm.

The numerics are those of backends/fp8.quantize_activation: s = max(amax, 1e-4)
/ fp8_max (optionally rounded up to a power of two, DeepSeek-V3.1's ue8m0),
q = clamp(x / s, -fp8_max, fp8_max) in the FP8 dtype of the output tensor. The
division is IEEE (div_rn) and the rounding to the FP8 grid is done in fp32
before the cast (`round_to_fp8_grid`), so the result is bit-identical to the
PyTorch reference on any backend, the CPU interpreter included (whose own
float32 -> fp8 cast mis-rounds values that carry into the next binade).

Scales are written with whatever strides the caller's tensor has; the wrappers
allocate them column-major ([M, K/128] with strides (1, M)), as
torch._scaled_mm's block-wise mode and the GEMM kernels read them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends.triton_kernels.configs import TileConfig

BLOCK = 128
SCALE_FLOOR = 1e-4


@triton.jit
def round_to_fp8_grid(v, MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr):
    """v (fp32, |v| <= the FP8 max) rounded to nearest-even on the e4m3 grid, still in fp32.

    Normal values keep 3 mantissa bits (integer rounding on the fp32 bits, a carry moves
    to the next binade); values under MIN_NORMAL round to multiples of MIN_NORMAL / 8 by
    the add-and-subtract trick. The later cast to FP8 is then exact. A negative value that
    rounds to zero gives -0 where the format has it (NEG_ZERO: e4m3fn), else +0 (e4m3fnuz,
    whose -0 pattern is NaN).
    """
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    magic: tl.constexpr = MIN_NORMAL * 0.125 * 12582912.0  # 1.5 * 2^23 subnormal steps
    subnormal = (v + magic) - magic
    if NEG_ZERO:  # the zero carries v's sign bit (a -0.0 literal may be folded to +0.0 by the compiler)
        signed_zero = (bits & 0x80000000).to(tl.float32, bitcast=True)
        subnormal = tl.where(subnormal == 0, signed_zero, subnormal)
    # NaN stays NaN (its bits would carry into the sign or exponent above)
    return tl.where(v != v, v, tl.where(tl.abs(v) >= MIN_NORMAL, rounded, subnormal))


def fp8_constants(dtype: torch.dtype) -> dict:
    """The constexpr arguments describing an FP8 dtype: its smallest normal and whether it has -0."""
    return {"MIN_NORMAL": torch.finfo(dtype).smallest_normal, "NEG_ZERO": dtype == torch.float8_e4m3fn}


@triton.jit
def cast_rne(v, dtype: tl.constexpr):
    """fp32 v cast to `dtype`, rounding to nearest-even also for bf16 under the CPU interpreter (whose
    own float32 -> bf16 cast truncates): the rounding is done on the fp32 bits first."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # NaN stays NaN: CUDA's canonical NaN 0x7FFFFFFF would otherwise carry over into -0
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def block_scale(amax, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """The fp32 scale of a block from its amax: max(amax, 1e-4) / FP8_MAX, optionally rounded up to 2^n."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), FP8_MAX)
    if UE8M0:
        bits = scale.to(tl.uint32, bitcast=True)
        up = ((bits & 0x7FFFFF) != 0).to(tl.uint32)
        scale = ((bits & 0x7F800000) + (up << 23)).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def quantize_tile(x, scale, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr):
    """x [R, 128] fp32 over its per-row scale [R] -> values on the FP8 grid (fp32)."""
    v = tl.math.div_rn(x, scale[:, None])
    v = tl.where(v != v, v, tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX))  # min/max would drop a NaN
    return round_to_fp8_grid(v, MIN_NORMAL, NEG_ZERO)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
                  FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr, UE8M0: tl.constexpr,
                  ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    cols = group * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = block_scale(tl.max(tl.abs(x), axis=1), FP8_MAX, UE8M0)
    q = quantize_tile(x, scale, FP8_MAX, MIN_NORMAL, NEG_ZERO)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + group * stride_sg, scale, mask=rows < M)


def empty_scales(rows: int, cols: int, device) -> torch.Tensor:
    """A float32 [rows, ceil(cols/128)] scale tensor stored column-major (strides (1, rows))."""
    return torch.empty(triton.cdiv(cols, BLOCK), rows, dtype=torch.float32, device=device).t()


def quantize_activation(x: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float, ue8m0: bool,
                        config: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [M, K] per row per 128 columns.

    Args:
        x: [M, K] floating point, unit stride along K.
        fp8_dtype: torch.float8_e4m3fn or torch.float8_e4m3fnuz (the output's dtype).
        fp8_max: the value a block's amax maps to.
        ue8m0: round scales up to powers of two.
        config: block_m = rows per program, launch = Triton launch keywords.
    Returns:
        (q [M, K] fp8_dtype, scales float32 [M, ceil(K/128)] column-major).
    """
    m, k = x.shape
    q = torch.empty((m, k), dtype=fp8_dtype, device=x.device)
    s = empty_scales(m, k, x.device)
    if m == 0:
        return q, s
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, BLOCK))
    _quant_kernel[grid](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
                        FP8_MAX=float(fp8_max), **fp8_constants(fp8_dtype), UE8M0=bool(ue8m0),
                        ROWS=config.block_m, **config.launch)
    return q, s


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
    lanes = tl.arange(0, 128)[None, :]
    row_groups = tl.arange(0, ROW_GROUPS)
    row_cols = row_groups[:, None] * 128 + lanes
    x_row = _load_summed(x_ptr, r_ptr, row, stride_x, stride_r, row_cols, row_cols < K, HAS_RESIDUAL)
    xf = x_row.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / K + eps)
    if GROUPS >= ROW_GROUPS:
        _normalize_groups(x_row, row_groups, row_cols, rstd, row, w_ptr, out_ptr, h_ptr, q_ptr, s_ptr, K,
                          stride_out, stride_h, stride_q, stride_sm, stride_sg,
                          HAS_RESIDUAL, QUANT, FP8_MAX, MIN_NORMAL, NEG_ZERO, UE8M0)
    else:
        for first in range(tl.program_id(1) * GROUPS, tl.cdiv(K, 128), parts * GROUPS):
            groups = first + tl.arange(0, GROUPS)
            cols = groups[:, None] * 128 + lanes
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
        tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups * 128 < K)


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
    row_groups = triton.next_power_of_2(triton.cdiv(k, BLOCK))
    parts = triton.cdiv(k, config.block_n) if m <= config.block_m else 1
    # a whole row without quantization is normalized as read (H100: 83 against 94 us for 4096 x 7168);
    # the quantization goes faster block_n columns at a time (125 against 144 us)
    groups = row_groups if parts == 1 and quant is None else config.block_n // BLOCK
    dummy = out
    _rms_norm_kernel[(m, parts)](
        x, residual if residual is not None else dummy, weight, out, h if h is not None else dummy,
        q if q is not None else dummy, s if s is not None else dummy, k, float(eps), parts,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        h.stride(0) if h is not None else 0, q.stride(0) if q is not None else 0,
        s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
        HAS_RESIDUAL=residual is not None, QUANT=quant is not None,
        FP8_MAX=float(quant[1]) if quant else 448.0,
        **fp8_constants(quant[0] if quant else torch.float8_e4m3fn),
        UE8M0=bool(quant[2]) if quant else False,
        ROW_GROUPS=row_groups, GROUPS=groups, **config.launch)
    return out, h, q, s
