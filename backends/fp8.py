"""The FP8 table (formats, maxima, the 128 block) and the block-quantization math every backend, the
loader and `dsv3 convert` share.

Plain PyTorch only. The DeepSeek-V3 checkpoint stores each quantized linear as
an e4m3fn weight [out, in] and a float32 `weight_scale_inv` with one entry per
128x128 block (partial blocks at the edges included); activations are quantized
per token per 128 channels at run time. Every default that needs an FP8 fact reads
it here; the one setting from the environment is DSV3_FP8_MAX (the activation max).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from dsv3.backends.errors import BackendError

#: FP8 format name -> its torch dtype
FP8_FORMATS: dict[str, torch.dtype] = {"e4m3fn": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
#: the largest finite value of each FP8 format: weight blocks map their amax to it, and it bounds any
#: activation max
FP8_FORMAT_MAX: dict[str, float] = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
#: the default activation max of each format (vLLM and SGLang use 224, not 240, on e4m3fnuz)
FP8_ACTIVATION_MAX: dict[str, float] = {"e4m3fn": 448.0, "e4m3fnuz": 224.0}
#: the environment variable that sets the activation max (e.g. 240 instead of 224 on gfx942)
FP8_MAX_ENV = "DSV3_FP8_MAX"
#: the scale block: 1 x BLOCK for activations, BLOCK x BLOCK for weights
BLOCK = 128
SCALE_FLOOR = 1e-4  # keeps an all-zero block from giving 0/0 = NaN


def format_name(dtype: torch.dtype) -> str:
    """"e4m3fn" or "e4m3fnuz" for an FP8 dtype."""
    return str(dtype).removeprefix("torch.float8_")


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 240 for e4m3fnuz)."""
    return FP8_FORMAT_MAX[format_name(dtype)]


def check_fp8_max(value, fp8_format: str, source: str) -> float:
    """`value` as an activation max for `fp8_format`, from `source` (named in the error).

    Raises:
        BackendError: not a number in (0, the format's largest finite value].
    """
    limit = FP8_FORMAT_MAX[fp8_format]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 < number <= limit:
        raise BackendError(f"{source}={value}: expected a number in (0, {limit:g}] for {fp8_format} activations")
    return number


def activation_max(fp8_format: str, env: Mapping[str, str] | None = None) -> float:
    """The activation max of `fp8_format`: DSV3_FP8_MAX where `env` sets it (checked), else the table's.

    Raises:
        BackendError: DSV3_FP8_MAX is not a number in (0, the format's max].
    """
    value = (env or {}).get(FP8_MAX_ENV)
    if value in (None, ""):
        return FP8_ACTIVATION_MAX[fp8_format]
    return check_fp8_max(value, fp8_format, FP8_MAX_ENV)


def num_blocks(size: int, block: int = BLOCK) -> int:
    return math.ceil(size / block)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """Repeat a [ceil(rows/b), ceil(cols/b)] block-scale grid to [rows, cols] (last dims)."""
    expanded = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return expanded[..., :rows, :cols]


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8 weight [..., out, in] times its 128x128 block scales, in `dtype`.

    Args:
        weight: FP8 tensor [..., out, in].
        scale_inv: float32 [..., ceil(out/128), ceil(in/128)].
        dtype: result dtype.
    Returns:
        The dequantized weight [..., out, in].
    """
    if weight.dim() > 2:  # stacked experts: one matrix at a time keeps the fp32 temporaries small
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        for index in range(weight.shape[0]):
            out[index] = dequantize_blocks(weight[index], scale_inv[index], dtype)
        return out
    rows, cols = weight.shape[-2:]
    scale = expand_block_scales(scale_inv.float(), rows, cols)
    return (weight.float() * scale).to(dtype)


def quantize_blocks(weight: torch.Tensor,
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a weight [..., out, in] with one scale per 128x128 block.

    Returns:
        (fp8 weight [..., out, in], float32 scale_inv [..., ceil(out/128), ceil(in/128)]).
    """
    rows, cols = weight.shape[-2:]
    pad_r, pad_c = -rows % BLOCK, -cols % BLOCK
    w = torch.nn.functional.pad(weight.float(), (0, pad_c, 0, pad_r))
    lead = w.shape[:-2]
    blocks = w.reshape(*lead, (rows + pad_r) // BLOCK, BLOCK, (cols + pad_c) // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(SCALE_FLOOR)
    scale = amax / torch.full_like(amax, fp8_max(fp8_dtype))
    q = (blocks / scale[..., :, None, :, None]).reshape(w.shape)[..., :rows, :cols]
    return q.to(fp8_dtype), scale


def quantize_activation(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    max_value: float | None = None,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token per 128 channels.

    s = max(amax, 1e-4) / max_value, optionally rounded up to a power of two
    (DeepSeek-V3.1's ue8m0 scales); q = x / s cast to `fp8_dtype`.

    Args:
        x: [..., K]; K need not be a multiple of 128 (the last block is partial).
        fp8_dtype: e4m3fn or e4m3fnuz.
        max_value: the value amax maps to; defaults to the format's activation max (448, or 224 on e4m3fnuz).
        power_of_two: round scales up to powers of two.
    Returns:
        (q [..., K] in fp8_dtype, scales float32 [..., ceil(K/128)]).
    """
    k = x.shape[-1]
    max_value = FP8_ACTIVATION_MAX[format_name(fp8_dtype)] if max_value is None else max_value
    padded = torch.nn.functional.pad(x.float(), (0, -k % BLOCK))
    blocks = padded.unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(dim=-1).clamp_min(SCALE_FLOOR)
    # a true division on every device: CUDA turns division by a Python scalar into a reciprocal multiply
    scale = amax / torch.full_like(amax, max_value)
    if power_of_two:  # exact ceil to 2^n (log2 in fp32 rounds 2^n * (1 + 2^-23) down to n)
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))
    q = (blocks / scale[..., None]).clamp(-max_value, max_value).flatten(-2)[..., :k]
    return q.to(fp8_dtype), scale


def block_scaled_matmul(qa: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor,
                        scale_w: torch.Tensor) -> torch.Tensor:
    """The exact block-scaled FP8 product in fp32: each 128-wide K block multiplied in fp32, scaled by
    scale_a x scale_w, and the blocks summed.

    Args:
        qa: FP8 activations [M, K]; scale_a: float32 [M, ceil(K/128)] (any strides).
        weight: FP8 [N, K]; scale_w: float32 [ceil(N/128), ceil(K/128)].
    Returns:
        float32 [M, N].
    """
    n, k = weight.shape
    w_scale_rows = scale_w.repeat_interleave(BLOCK, dim=0)[:n]  # [N, K blocks]
    out = torch.zeros(qa.shape[0], n, dtype=torch.float32, device=qa.device)
    for kb in range(num_blocks(k)):
        cols = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
        partial = qa[:, cols].float() @ weight[:, cols].float().T
        out += partial * scale_a[:, kb, None] * w_scale_rows[None, :, kb]
    return out


def fn_to_fnuz(weight: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an e4m3fn block-quantized weight to e4m3fnuz for MI300X (gfx942).

    The bits are reinterpreted; the pattern 0x80 (-0 in fn, NaN in fnuz) becomes 0,
    and every scale is doubled because fnuz's exponent bias is one larger, so the
    same bits mean half the value.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fn_to_fnuz expects float8_e4m3fn, got {weight.dtype}")
    bits = weight.view(torch.uint8).clone()
    bits[bits == 0x80] = 0
    return bits.view(torch.float8_e4m3fnuz), scale_inv * 2.0


def fnuz_to_fn(weight: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of fn_to_fnuz: e4m3fnuz blocks back to e4m3fn with halved scales, values unchanged.

    The bits are kept; fnuz's NaN pattern 0x80 (which is -0 in fn) becomes fn's NaN 0x7F.
    """
    if weight.dtype != torch.float8_e4m3fnuz:
        raise TypeError(f"fnuz_to_fn expects float8_e4m3fnuz, got {weight.dtype}")
    bits = weight.view(torch.uint8).clone()
    bits[bits == 0x80] = 0x7F
    return bits.view(torch.float8_e4m3fn), scale_inv * 0.5
