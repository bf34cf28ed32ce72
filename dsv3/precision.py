"""The precision policy: FP8 where the chip has it and the checkpoint is FP8, else BF16."""

from __future__ import annotations

from backends.interface import Capabilities
from dsv3.errors import Dsv3Error

CHOICES = ("auto", "fp8", "bf16", "fp32")


def resolve_precision(requested: str, capabilities: Capabilities, checkpoint_fp8: bool) -> tuple[str, str]:
    """Pick the compute precision.

    Args:
        requested: "auto", "fp8", "bf16" or "fp32".
        capabilities: the chosen backend's capabilities.
        checkpoint_fp8: the checkpoint stores FP8 block-quantized linears.
    Returns:
        (precision, a one-line explanation).
    """
    if requested not in CHOICES:
        raise Dsv3Error(f"--precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    stored = "FP8" if checkpoint_fp8 else "BF16"
    if requested == "auto":
        if checkpoint_fp8 and capabilities.native_fp8:
            return "fp8", f"precision fp8: {stored} checkpoint on a chip with FP8 ({_fmt(capabilities)})"
        if checkpoint_fp8:
            return "bf16", (f"precision bf16: {capabilities.device} has no native FP8, so the FP8 checkpoint "
                            "is dequantized to BF16 tensor by tensor while it loads")
        return "bf16", "precision bf16: BF16 checkpoint"
    if requested == "fp8":
        if capabilities.fp8_dtype is None:
            raise Dsv3Error(f"--precision fp8: backend {capabilities.name} on {capabilities.device} has no FP8; "
                            "use --precision bf16 (or auto, which falls back to BF16)")
        how = "native" if capabilities.native_fp8 else "emulated"
        quantized = "" if checkpoint_fp8 else ", BF16 checkpoint block-quantized 128x128 at load"
        return "fp8", f"precision fp8 ({_fmt(capabilities)}, {how}{quantized})"
    return requested, f"precision {requested} (requested)"


def _fmt(capabilities: Capabilities) -> str:
    return str(capabilities.fp8_dtype).removeprefix("torch.float8_") if capabilities.fp8_dtype else "no FP8"
