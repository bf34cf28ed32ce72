"""Interleaved rotary embedding in one launch (the torch version takes about nine per call).

For each token t and head h, pairs (x[2i], x[2i+1]) rotate by the token's angle i:
    out[2i] = x[2i] cos - x[2i+1] sin,  out[2i+1] = x[2i] sin + x[2i+1] cos,
in fp32 and rounded to x's dtype once, as the reference backend computes it. One program
rotates BLOCK_H heads of one token; x may be a strided view (the rope columns of q or kv_a).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backends.triton_kernels.quant import cast_rne


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, half, stride_xt, stride_xh, stride_ct,
                   BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_I)
    mask = (h[:, None] < heads) & (i[None, :] < half)
    x = x_ptr + token * stride_xt + h[:, None] * stride_xh + 2 * i[None, :]
    even = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(x + 1, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_ct + i, mask=i < half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + token * stride_ct + i, mask=i < half, other=0.0)[None, :]
    out = out_ptr + (token * heads + h[:, None]) * (2 * half) + 2 * i[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out, cast_rne(even * cos - odd * sin, dtype), mask=mask)
    tl.store(out + 1, cast_rne(even * sin + odd * cos, dtype), mask=mask)


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
        BLOCK_H=block_h, BLOCK_I=triton.next_power_of_2(rope // 2), num_warps=4)
    return out
