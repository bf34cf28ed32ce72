"""AMD Instinct GPUs through a ROCm build of PyTorch: the rocm backend (shared Triton kernels, AMD tiles).

The arch comes from gcnArchName, never from the capability number: AMD GPUs report CUDA-style
capabilities (9, 4) and (9, 5) that pass a naive ">= 9.0 means Hopper" check.
"""

from __future__ import annotations

import torch
from dsv3.backends.platforms.base import ChipInfo, Platform
from dsv3.backends.triton_kernels import amd_configs
from dsv3.backends.triton_kernels.configs import DecodeConfig, KernelConfigs


class AmdPlatform(Platform):
    def probe(self, torch_module, find_spec=None, import_module=None, index: int = 0) -> ChipInfo | None:
        """An AMD GPU on a ROCm build of PyTorch."""
        if getattr(torch_module.version, "hip", None) is None:
            return None
        cuda = torch_module.cuda
        if not cuda.is_available() or cuda.device_count() < 1:
            return None
        props = cuda.get_device_properties(index)
        return self.describe(str(props.gcnArchName), name=str(props.name), memory_bytes=int(props.total_memory),
                             count=cuda.device_count())

    def fp8_format(self, arch: str) -> str | None:
        """gfx942 (MI300X/MI325X) has e4m3fnuz only; gfx950 (MI355X) has OCP e4m3fn; older CDNA none."""
        return {"gfx942": "e4m3fnuz", "gfx950": "e4m3fn"}.get(self.base_arch(arch))

    def kernel_configs(self, arch: str, native: bool = True) -> KernelConfigs:
        return amd_configs.kernel_configs(self.base_arch(arch), amd_launch=native)

    def mla_decode_config(self, arch: str, num_heads: int, dtype: torch.dtype, native: bool = True) -> DecodeConfig:
        return amd_configs.mla_decode_config(self.base_arch(arch), num_heads, dtype, amd_launch=native)


AMD = AmdPlatform(
    vendor="amd", backend="rocm", backend_class="dsv3.backends.rocm:RocmBackend", torch_device="cuda",
    dist_backend="nccl", pip_extra="rocm", packages=("triton",),
    compute_units={"gfx942": 304, "gfx950": 256, "gfx90a": 110}, default_compute_units=304)
