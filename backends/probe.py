"""Finding this machine's accelerator, with no side effects: the one place that probes the chip.

The probe reads device properties and nothing more: it compiles no kernel,
allocates no memory and imports no vendor module except torch_npu, which is
how an Ascend NPU is detected (and only after importlib finds it installed).
Order: Ascend, then ROCm, then CUDA, else the CPU. `probe_device` describes the
chip of one device for a backend built without a described chip.

`torch_module`, `find_spec` and `import_module` can be replaced by fakes, so
tests describe an H100 or an MI300X without one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import platform
from types import ModuleType
from typing import Callable

from dsv3.backends import fp8
from dsv3.backends.chips import ChipInfo, describe_chip
from dsv3.backends.errors import BackendUnavailable

#: Ascend SoC ids (torch_npu._C._npu_get_soc_version()) -> arch
ASCEND_SOC_IDS: dict[range, str] = {
    range(220, 226): "ascend910b",
    range(250, 256): "ascend910c",
    range(260, 261): "ascend950",
}

#: device-name prefixes (lower case, underscores removed) -> arch, where the SoC id is unknown
ASCEND_NAME_PREFIXES: tuple[tuple[str, str], ...] = (
    ("ascend910b", "ascend910b"),
    ("ascend910c", "ascend910c"),
    ("ascend91093", "ascend910c"),  # 910C cards report "Ascend910_93xx"
    ("ascend91095", "ascend950"),
    ("ascend950", "ascend950"),
)


def probe(torch_module: ModuleType | None = None,
          find_spec: Callable = importlib.util.find_spec,
          import_module: Callable = importlib.import_module) -> ChipInfo:
    """The first accelerator found (Ascend, ROCm, CUDA), else the CPU.

    Args:
        torch_module: torch, or a fake with the same attributes (tests).
        find_spec, import_module: importlib's functions, or fakes (tests).
    Returns:
        A ChipInfo with vendor, arch, name, FP8 facts, memory per device and device count.
    """
    if torch_module is None:
        import torch as torch_module
    return (probe_ascend(torch_module, find_spec, import_module)
            or probe_rocm(torch_module)
            or probe_cuda(torch_module)
            or cpu_chip())


def probe_ascend(torch_module, find_spec: Callable, import_module: Callable) -> ChipInfo | None:
    """An Ascend NPU when torch_npu is installed, imports (it needs Huawei's CANN) and sees a device."""
    if find_spec("torch_npu") is None:
        return None
    try:
        torch_npu = import_module("torch_npu")  # registers torch.npu
    except (ImportError, OSError, RuntimeError):
        return None
    npu = getattr(torch_module, "npu", None)
    if npu is None or not npu.is_available() or npu.device_count() < 1:
        return None
    return ascend_chip(npu, torch_npu)


def ascend_chip(npu, torch_npu, index: int = 0) -> ChipInfo:
    """NPU `index` described from torch_npu's device queries (`npu`: torch.npu or torch_npu.npu)."""
    name = str(npu.get_device_name(index))
    memory = getattr(npu.get_device_properties(index), "total_memory", 0)
    return describe_chip("huawei", ascend_arch(name, _soc_id(torch_npu)), name=name,
                         memory_bytes=int(memory or 0), count=npu.device_count())


def _soc_id(torch_npu) -> int | None:
    try:
        return int(torch_npu._C._npu_get_soc_version())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None


def ascend_arch(name: str, soc_id: int | None = None) -> str:
    """"ascend910b", "ascend910c" or "ascend950" from the SoC id, else from the device name.

    Args:
        name: the device name torch.npu reports, e.g. "Ascend910B3" or "Ascend910_9391".
        soc_id: torch_npu's SoC version number, e.g. 223, or None.
    Returns:
        The arch string; for another Ascend chip its name in lower case.
    """
    if soc_id is not None:
        for ids, arch in ASCEND_SOC_IDS.items():
            if soc_id in ids:
                return arch
    compact = name.lower().replace("_", "").replace(" ", "")
    for prefix, arch in ASCEND_NAME_PREFIXES:
        if compact.startswith(prefix):
            return arch
    return compact or "ascend"


def probe_rocm(torch_module, index: int = 0) -> ChipInfo | None:
    """An AMD GPU on a ROCm build of PyTorch; the arch comes from gcnArchName, never from the capability."""
    if getattr(torch_module.version, "hip", None) is None:
        return None
    cuda = torch_module.cuda
    if not cuda.is_available() or cuda.device_count() < 1:
        return None
    props = cuda.get_device_properties(index)
    return describe_chip("amd", str(props.gcnArchName), name=str(props.name),
                         memory_bytes=int(props.total_memory), count=cuda.device_count())


def probe_cuda(torch_module, index: int = 0) -> ChipInfo | None:
    """An NVIDIA GPU on a CUDA build of PyTorch; arch sm_XY from its compute capability."""
    if getattr(torch_module.version, "hip", None) is not None:
        return None
    cuda = torch_module.cuda
    if not cuda.is_available() or cuda.device_count() < 1:
        return None
    major, minor = cuda.get_device_capability(index)
    props = cuda.get_device_properties(index)
    return describe_chip("nvidia", f"sm_{major}{minor}", name=str(props.name),
                         memory_bytes=int(props.total_memory), count=cuda.device_count())


def probe_device(vendor: str, device, torch_module: ModuleType | None = None) -> ChipInfo:
    """The chip of `vendor` ("nvidia" or "amd") at torch device `device` ("cuda:N").

    Raises:
        BackendUnavailable: this torch is built for another vendor, or sees no such GPU.
    """
    if torch_module is None:
        import torch as torch_module
    index = getattr(device, "index", None)
    hip = getattr(torch_module.version, "hip", None)
    if vendor == "amd" and hip is None:
        raise BackendUnavailable("the rocm backend needs a ROCm build of PyTorch (torch.version.hip is None); "
                                 "this torch is built for CUDA or the CPU")
    if vendor == "nvidia" and hip is not None:
        raise BackendUnavailable("the cuda backend runs on NVIDIA GPUs; this torch is built for ROCm "
                                 "(use the rocm backend)")
    cuda = torch_module.cuda
    if not cuda.is_available() or cuda.device_count() < 1:
        backend, kind = ("rocm", "AMD") if vendor == "amd" else ("cuda", "NVIDIA")
        raise BackendUnavailable(f"the {backend} backend found no {kind} GPU (torch.cuda.is_available() is False)")
    index = cuda.current_device() if index is None else index
    chip = (probe_rocm if vendor == "amd" else probe_cuda)(torch_module, index)
    if chip.fp8_format is not None and os.environ.get(fp8.FP8_MAX_ENV):  # as select() applies it
        chip = dataclasses.replace(chip, fp8_max=fp8.activation_max(chip.fp8_format, os.environ))
    return chip


def cpu_chip() -> ChipInfo:
    """The host CPU: its model name and physical memory."""
    return describe_chip("cpu", "cpu", name=cpu_name(), memory_bytes=host_memory_bytes(), count=1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
