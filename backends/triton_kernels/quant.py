"""Activation quantization per token per 128 channels, and the FP8 helpers other kernels share.

The numerics are those of backends/fp8.quantize_activation: s = max(amax, 1e-4)
/ fp8_max (optionally rounded up to a power of two, DeepSeek-V3.1's ue8m0),
q = clamp(x / s, -fp8_max, fp8_max) in the FP8 dtype of the output tensor. The
division is IEEE (div_rn) and the rounding to the FP8 grid is done in fp32
before the cast (`round_to_fp8_grid`), so the result is bit-identical to the
PyTorch reference on any backend, the CPU interpreter included (whose own
float32 -> fp8 cast mis-rounds values that carry into the next binade).

Scales are written with whatever strides the caller's tensor has; the wrappers
allocate them column-major (norm.py's fused quantization too) ([M, K/128] with strides (1, M)), as
torch._scaled_mm's block-wise mode and the GEMM kernels read them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends import fp8
from dsv3.backends.triton_kernels.configs import TileConfig

#: the scale block (fp8.BLOCK) and the scale floor (fp8.SCALE_FLOOR) inside the kernels
BLOCK_K = tl.constexpr(fp8.BLOCK)
SCALE_FLOOR = tl.constexpr(fp8.SCALE_FLOOR)


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
    scale = tl.math.div_rn(tl.maximum(amax, SCALE_FLOOR), FP8_MAX)
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
    cols = group * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = block_scale(tl.max(tl.abs(x), axis=1), FP8_MAX, UE8M0)
    q = quantize_tile(x, scale, FP8_MAX, MIN_NORMAL, NEG_ZERO)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + group * stride_sg, scale, mask=rows < M)


def empty_scales(rows: int, cols: int, device) -> torch.Tensor:
    """A float32 [rows, ceil(cols/128)] scale tensor stored column-major (strides (1, rows))."""
    return torch.empty(triton.cdiv(cols, fp8.BLOCK), rows, dtype=torch.float32, device=device).t()


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
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(k, fp8.BLOCK))
    _quant_kernel[grid](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
                        FP8_MAX=float(fp8_max), **fp8_constants(fp8_dtype), UE8M0=bool(ue8m0),
                        ROWS=config.block_m, **config.launch)
    return q, s
