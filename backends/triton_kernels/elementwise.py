"""The small elementwise ops in one launch each (torch takes two to nine per call).

rotary: for each token t and head h, pairs (x[2i], x[2i+1]) rotate by the token's angle i:
    out[2i] = x[2i] cos - x[2i+1] sin,  out[2i+1] = x[2i] sin + x[2i+1] cos,
in fp32 and rounded to x's dtype once, as the reference backend computes it. One program
rotates BLOCK_H heads of one token; x may be a strided view (the rope columns of q or kv_a).

swiglu: silu(gate) * up with silu rounded to the dtype before the product, as torch's two ops
round; gate and up may be the two halves of one fused GEMM output (row-strided views).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends.triton_kernels.quant import cast_rne

#: launch option of kernels whose products must round as torch's separate multiply and add do
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def rotate_pairs(x, cos, sin, ROWS: tl.constexpr, HALF: tl.constexpr):
    """x [ROWS, 2 * HALF] with pairs (x[2i], x[2i+1]) rotated by cos[i], sin[i] ([1, HALF] float32), in fp32.

    Whole rows come in (one coalesced load) and are split into pairs in registers. The MLA decode
    kernel rotates with this too, so a fused rotation rounds as the rotary op does. Kernels that call it
    launch with NO_FMA: a product contracted into an FMA rounds once where torch rounds twice, and that
    changed about one rotated BF16 value in 50,000 (the H200 showed it in the FP8 cache's byte check).
    """
    even, odd = tl.split(tl.reshape(x.to(tl.float32), (ROWS, HALF, 2)))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (ROWS, 2 * HALF))


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half, stride_xt, stride_xh, stride_ct,
                   BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, 2 * BLOCK_I)
    mask = (h[:, None] < heads) & (j[None, :] < 2 * half)
    x = tl.load(x_ptr + token * stride_xt + h[:, None] * stride_xh + j[None, :], mask=mask, other=0.0)
    i = tl.arange(0, BLOCK_I)
    cos = tl.load(cos_ptr + token * stride_ct + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + token * stride_ct + i, mask=i < half, other=0.0)[None, :]
    out = rotate_pairs(x, cos, sin, BLOCK_H, BLOCK_I)
    dst = out_ptr + (token * heads + h[:, None]) * (2 * half) + j[None, :]
    tl.store(dst, cast_rne(out, out_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, R] or [B, T, H, R] (last dim unit-stride) rotated by cos, sin [B, T, R/2] (float32).

    Returns a contiguous tensor of x's shape and dtype.
    """
    b, t, rope = x.shape[0], x.shape[1], x.shape[-1]
    x4 = x.view(b, t, 1, rope) if x.dim() == 3 else x
    if x4.stride(-1) != 1 or (b > 1 and x4.stride(0) != t * x4.stride(1)):
        x4 = x4.contiguous()  # tokens must sit at one stride
    cos = cos.reshape(b * t, rope // 2).float().contiguous()
    sin = sin.reshape(b * t, rope // 2).float().contiguous()
    heads = x4.shape[2]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_h = min(16, triton.next_power_of_2(heads))
    _rotary_kernel[(b * t, triton.cdiv(heads, block_h))](
        x4, cos, sin, out, heads, rope // 2, x4.stride(1), x4.stride(2), cos.stride(0),
        BLOCK_H=block_h, BLOCK_I=triton.next_power_of_2(rope // 2), num_warps=4, **NO_FMA)
    return out


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, cols, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    gate = tl.load(gate_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = cast_rne(gate / (1.0 + tl.exp(-gate)), dtype).to(tl.float32)
    tl.store(out_ptr + row * cols + offs, cast_rne(silu * up, dtype), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., I] of one dtype (each unit-stride in its last dim)."""
    shape, cols = gate.shape, gate.shape[-1]
    gate2, up2 = gate.reshape(-1, cols), up.reshape(-1, cols)
    if gate2.stride(-1) != 1 or up2.stride(-1) != 1:
        gate2, up2 = gate2.contiguous(), up2.contiguous()
    out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(cols))
    _swiglu_kernel[(gate2.shape[0], triton.cdiv(cols, block))](gate2, up2, out, cols, gate2.stride(0),
                                                               up2.stride(0), BLOCK=block, num_warps=4)
    return out
