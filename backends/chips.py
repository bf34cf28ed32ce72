"""The platform facts, said once: what a chip can do (its FP8 format), the dense dtypes.

A chip's abilities are decided from its vendor and arch string, never from a capability number
alone: AMD GPUs report CUDA-style capabilities (9, 4) and (9, 5) that pass a naive ">= 9.0 means
Hopper" check; here FP8 support comes from the arch name. Finding the chip is backends/probe.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dsv3.backends.fp8 import FP8_ACTIVATION_MAX

#: the dtype of each dense precision
DENSE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ChipInfo:
    """A described or probed accelerator.

    Attributes:
        vendor: "nvidia", "amd", "huawei" or "cpu".
        arch: "sm_90", "sm_80", "gfx942", "gfx950", "ascend910b", "ascend910c", "ascend950", "cpu".
        name: the device name the driver reports (e.g. "NVIDIA H100 80GB HBM3").
        fp8_format: "e4m3fn", "e4m3fnuz" or None where the chip has no FP8.
        fp8_max: activation quantization max (448 for fn, 224 for fnuz by default).
        memory_bytes: memory per device (0 unknown).
        count: devices visible.
    """

    vendor: str
    arch: str
    name: str = ""
    fp8_format: str | None = None
    fp8_max: float | None = None
    memory_bytes: int = 0
    count: int = 1

    @property
    def has_fp8(self) -> bool:
        return self.fp8_format is not None


def fp8_format_for(vendor: str, arch: str) -> str | None:
    """The FP8 format a chip runs natively, or None.

    NVIDIA: sm_89 and sm_90 and newer have e4m3fn; sm_80/sm_86 have none.
    AMD: gfx942 (MI300X/MI325X) has e4m3fnuz only; gfx950 (MI355X) has OCP e4m3fn; older CDNA none.
    Huawei: 910B/910C have none; Ascend 950 has FP8.
    """
    arch = arch.lower()
    if vendor == "nvidia" and arch.startswith("sm_"):
        major_minor = int("".join(ch for ch in arch[3:] if ch.isdigit()) or 0)
        return "e4m3fn" if major_minor >= 89 else None
    if vendor == "amd":
        base = arch.split(":")[0]
        return {"gfx942": "e4m3fnuz", "gfx950": "e4m3fn"}.get(base)
    if vendor == "huawei":
        return "e4m3fn" if arch.startswith("ascend950") else None
    return None


def describe_chip(vendor: str, arch: str, name: str = "", memory_bytes: int = 0, count: int = 1,
                  fp8_max: float | None = None) -> ChipInfo:
    """Build a ChipInfo from vendor and arch, with the FP8 facts filled in."""
    fmt = fp8_format_for(vendor, arch)
    if fmt is not None and fp8_max is None:
        fp8_max = FP8_ACTIVATION_MAX[fmt]
    return ChipInfo(vendor=vendor, arch=arch.split(":")[0].lower(), name=name, fp8_format=fmt,
                    fp8_max=fp8_max if fmt else None, memory_bytes=memory_bytes, count=count)

