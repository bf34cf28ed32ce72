"""The precision policy: FP8 where the chip has it and the checkpoint is FP8, else BF16.

- auto: an FP8 checkpoint runs in FP8 on a chip with native FP8 (e4m3fn, or
  e4m3fnuz on MI300X with the weights converted at load); elsewhere it is
  dequantized to BF16 tensor by tensor while it loads. A BF16 checkpoint runs in BF16.
- fp8: FP8 on a chip without FP8 is an error naming the chip and the fallback
  (the reference backend emulates FP8 on any device, for tests). A BF16
  checkpoint is block-quantized 128x128 at load.
- bf16, fp32: dense weights; FP8 checkpoints are dequantized at load.
"""

from __future__ import annotations

from dsv3.backends.interface import Capabilities
from dsv3.backends.platforms import ChipInfo
from dsv3.backends.select import describe
from dsv3.errors import Dsv3Error

CHOICES = ("auto", "fp8", "bf16", "fp32")


def _dequantized(precision: str = "bf16") -> str:
    return f"the FP8 checkpoint is dequantized to {precision.upper()} tensor by tensor while it loads"


def resolve_precision(requested: str, capabilities: Capabilities, checkpoint_fp8: bool,
                      chip: ChipInfo | None = None, name: str = "--precision") -> tuple[str, str]:
    """Pick the compute precision.

    Args:
        requested: "auto", "fp8", "bf16" or "fp32".
        capabilities: the chosen backend's capabilities.
        checkpoint_fp8: the checkpoint stores FP8 block-quantized linears.
        chip: the chip the backend runs on, named in messages (the backend's device when None).
        name: how messages name the setting (EngineArgs.name: "precision" for a Python caller).
    Returns:
        (precision, a one-line explanation to print once).
    Raises:
        Dsv3Error: an unknown choice, or fp8 on a backend without FP8.
    """
    if requested not in CHOICES:
        raise Dsv3Error(f"{name} must be one of {', '.join(CHOICES)}, got {requested!r}")
    where = _where(capabilities, chip)
    if requested == "auto":
        if checkpoint_fp8 and capabilities.native_fp8:
            fmt = _format(capabilities)
            converted = ", weights converted to e4m3fnuz at load (scales doubled)" if fmt == "e4m3fnuz" else ""
            return "fp8", f"precision fp8: FP8 checkpoint run natively in {fmt} by {where}{converted}"
        if checkpoint_fp8:
            return "bf16", f"precision bf16: {where} has no native FP8, so {_dequantized()}"
        return "bf16", "precision bf16: BF16 checkpoint"
    if requested == "fp8":
        if capabilities.fp8_dtype is None:
            raise Dsv3Error(f"{name} fp8: {where} has no FP8; use {name} bf16 or auto "
                            "(an FP8 checkpoint is then dequantized to BF16 while it loads)")
        how = "native" if capabilities.native_fp8 else "emulated in fp32, slow"
        quantized = "" if checkpoint_fp8 else "; the BF16 checkpoint is block-quantized 128x128 at load"
        return "fp8", f"precision fp8 (requested): {_format(capabilities)} on {where}, {how}{quantized}"
    dequantized = f": {_dequantized(requested)}" if checkpoint_fp8 else ""
    return requested, f"precision {requested} (requested){dequantized}"


def _where(capabilities: Capabilities, chip: ChipInfo | None) -> str:
    if chip is None:
        return f"the {capabilities.name} backend on {capabilities.device}"
    return f"the {capabilities.name} backend on {describe(chip)}"


def _format(capabilities: Capabilities) -> str:
    return str(capabilities.fp8_dtype).removeprefix("torch.float8_")
