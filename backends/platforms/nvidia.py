"""NVIDIA GPUs through a CUDA build of PyTorch: the cuda backend (shared Triton kernels, cuBLAS)."""

from __future__ import annotations

from dsv3.backends.platforms.base import ChipInfo, Platform
from dsv3.backends.triton_kernels import configs


class NvidiaPlatform(Platform):
    def probe(self, torch_module, find_spec=None, import_module=None, index: int = 0) -> ChipInfo | None:
        """An NVIDIA GPU on a CUDA build of PyTorch; arch sm_XY from its compute capability."""
        if getattr(torch_module.version, "hip", None) is not None:
            return None
        cuda = torch_module.cuda
        if not cuda.is_available() or cuda.device_count() < 1:
            return None
        major, minor = cuda.get_device_capability(index)
        props = cuda.get_device_properties(index)
        return self.describe(f"sm_{major}{minor}", name=str(props.name), memory_bytes=int(props.total_memory),
                             count=cuda.device_count())

    def fp8_format(self, arch: str) -> str | None:
        """e4m3fn from sm_89 (Ada) and sm_90 (Hopper) on; sm_80/sm_86 have no FP8."""
        arch = self.base_arch(arch)
        if not arch.startswith("sm_"):
            return None
        return "e4m3fn" if int("".join(ch for ch in arch[3:] if ch.isdigit()) or 0) >= 89 else None

    def kernel_configs(self, arch: str, native: bool = True) -> configs.KernelConfigs:
        return configs.kernel_configs(self.base_arch(arch))


NVIDIA = NvidiaPlatform(
    vendor="nvidia", backend="cuda", backend_class="dsv3.backends.cuda:CudaBackend", torch_device="cuda",
    dist_backend="nccl", pip_extra="cuda", packages=("triton",),
    default_compute_units=132)  # an H100 SXM's SMs, where the device cannot be asked
