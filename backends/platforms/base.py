"""The Platform record every vendor fills in, and ChipInfo, the description of one accelerator."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping

import torch
from dsv3.backends import fp8
from dsv3.backends.triton_kernels.configs import PORTABLE, DecodeConfig, KernelConfigs, default_decode_config


@dataclass(frozen=True)
class ChipInfo:
    """A described or probed accelerator.

    Attributes:
        vendor: "nvidia", "amd", "huawei" or "cpu" (the Platform that describes it).
        arch: "sm_90", "sm_80", "gfx942", "gfx950", "ascend910b", "ascend910c", "ascend950", "cpu".
        name: the device name the driver reports (e.g. "NVIDIA H100 80GB HBM3").
        fp8_format: "e4m3fn", "e4m3fnuz" or None where the chip has no FP8.
        fp8_max: activation quantization max (the FP8 table's: 448 for fn, 224 for fnuz; or DSV3_FP8_MAX).
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


@dataclass(frozen=True, eq=False)  # one object per vendor: compared and hashed by identity
class Platform:
    """One vendor's facts: how to find its chips, what each arch can do, what runs it.

    Attributes:
        vendor: the ChipInfo.vendor it describes.
        backend: the backend auto selection builds for it (its registry name).
        backend_class: "module:Class" of that backend, imported only when it is built.
        torch_device: the device type PyTorch drives it with (ROCm builds say "cuda").
        dist_backend: torch.distributed backend between its devices.
        pip_extra: the extra of dsv3 that installs its vendor packages (None: nothing to install).
        packages: the modules that extra brings and the backend imports.
        mla_block_size: the paged latent cache's block size its attention runs fastest with (the engine's
            default where the user names none).
        compute_units: arch -> multiprocessors (SMs, CUs) per device, for sizing split-K grids before a
            device is seen.
        default_compute_units: the same for an arch not listed.
    The methods default to a chip without FP8 and the portable tile tables; a vendor overrides what differs.
    """

    vendor: str
    backend: str
    backend_class: str
    torch_device: str
    dist_backend: str
    pip_extra: str | None = None
    packages: tuple[str, ...] = ()
    mla_block_size: int = 64
    compute_units: Mapping[str, int] = field(default_factory=dict)
    default_compute_units: int = 4

    def probe(self, torch_module: ModuleType, find_spec: Callable, import_module: Callable) -> ChipInfo | None:
        """This vendor's first device, or None where there is none (reads device properties only)."""
        return None

    def base_arch(self, arch: str) -> str:
        """The arch without feature flags, in lower case ("gfx942:sramecc+" -> "gfx942")."""
        return arch.split(":")[0].lower()

    def fp8_format(self, arch: str) -> str | None:
        """The FP8 format `arch` runs natively ("e4m3fn", "e4m3fnuz"), or None."""
        return None

    def num_compute_units(self, arch: str) -> int:
        """Multiprocessors per device of `arch` as the table says (a device, where there is one, says better)."""
        return self.compute_units.get(self.base_arch(arch), self.default_compute_units)

    def kernel_configs(self, arch: str, native: bool = True) -> KernelConfigs:
        """The Triton kernels' tile table for `arch`; native=False for a run off this vendor's hardware (the
        CPU interpreter, another vendor's GPU), which drops launch keywords only its compiler takes."""
        return PORTABLE

    def mla_decode_config(self, arch: str, num_heads: int, dtype: torch.dtype, native: bool = True) -> DecodeConfig:
        """The MLA decode kernel's tiles for `num_heads` query heads and a cache of `dtype` on `arch`."""
        return default_decode_config(num_heads, dtype)

    def describe(self, arch: str, name: str = "", memory_bytes: int = 0, count: int = 1,
                 fp8_max: float | None = None) -> ChipInfo:
        """A ChipInfo for `arch`, its FP8 facts from the FP8 table (fp8_max overrides the activation max)."""
        fmt = self.fp8_format(arch)
        if fmt is not None and fp8_max is None:
            fp8_max = fp8.FP8_ACTIVATION_MAX[fmt]
        return ChipInfo(vendor=self.vendor, arch=self.base_arch(arch), name=name, fp8_format=fmt,
                        fp8_max=fp8_max if fmt else None, memory_bytes=memory_bytes, count=count)
