"""One Platform record per vendor, and the one place that probes the chip.

A Platform (base.py) says how to find its devices, what each arch can do (FP8 format, compute units,
the kernel tile tables, MLA's included), how PyTorch drives it (torch device, distributed backend),
which backend runs it and what to install for it (pip extra, the modules it brings), and the block size
of the paged latent cache its attention runs fastest with. `select` and the backends read these facts
here; a new vendor adds one module in this package (and its entry in PLATFORMS) and one backend file.

The probe reads device properties and nothing more: it compiles no kernel, allocates no memory and
imports no vendor module except torch_npu, which is how an Ascend NPU is detected. `torch_module`,
`find_spec` and `import_module` can be replaced by fakes, so tests describe an H100 or an MI300X
without one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable

from dsv3.backends import fp8
from dsv3.backends.errors import BackendUnavailable
from dsv3.backends.platforms.amd import AMD
from dsv3.backends.platforms.base import ChipInfo, Platform
from dsv3.backends.platforms.cpu import CPU, cpu_name
from dsv3.backends.platforms.huawei import HUAWEI, ascend_arch, ascend_chip
from dsv3.backends.platforms.nvidia import NVIDIA

__all__ = ["AMD", "CPU", "HUAWEI", "NVIDIA", "PLATFORMS", "ChipInfo", "Platform", "ascend_arch", "ascend_chip",
           "cpu_chip", "cpu_name", "describe_chip", "platform", "platform_of_backend", "probe", "probe_device"]

#: every vendor dsv3 knows; the CPU last (it is always there)
PLATFORMS: tuple[Platform, ...] = (HUAWEI, AMD, NVIDIA, CPU)


def platform(vendor: str) -> Platform:
    """The Platform of `vendor` ("nvidia", "amd", "huawei", "cpu")."""
    for candidate in PLATFORMS:
        if candidate.vendor == vendor:
            return candidate
    raise BackendUnavailable(f"unknown vendor {vendor!r}; dsv3 knows {', '.join(p.vendor for p in PLATFORMS)}")


def platform_of_backend(name: str) -> Platform | None:
    """The Platform whose backend is called `name`, or None."""
    return next((p for p in PLATFORMS if p.backend == name), None)


def describe_chip(vendor: str, arch: str, name: str = "", memory_bytes: int = 0, count: int = 1,
                  fp8_max: float | None = None) -> ChipInfo:
    """A ChipInfo from vendor and arch, with the FP8 facts filled in (no probing)."""
    return platform(vendor).describe(arch, name=name, memory_bytes=memory_bytes, count=count, fp8_max=fp8_max)


def cpu_chip() -> ChipInfo:
    """The host CPU."""
    return CPU.probe()


def probe(torch_module: ModuleType | None = None, find_spec: Callable = importlib.util.find_spec,
          import_module: Callable = importlib.import_module, vendor: str | None = None) -> ChipInfo:
    """This machine's accelerator, else the CPU.

    Args:
        torch_module: torch, or a fake with the same attributes (tests).
        find_spec, import_module: importlib's functions, or fakes (tests).
        vendor: probe only this vendor's platform (a backend asked for by name).
    Returns:
        A ChipInfo with vendor, arch, name, FP8 facts, memory per device and device count.
    Raises:
        BackendUnavailable: devices of two vendors are found (say which backend to use).
    """
    if torch_module is None:
        import torch as torch_module
    candidates = [p for p in PLATFORMS if p is not CPU and vendor in (None, p.vendor)]
    found = [chip for p in candidates if (chip := p.probe(torch_module, find_spec, import_module)) is not None]
    if len(found) > 1:
        names = " and ".join(f"{chip.vendor} {chip.arch}" for chip in found)
        backends = " or ".join(platform(chip.vendor).backend for chip in found)
        raise BackendUnavailable(f"found {names} devices: choose one with --backend {backends} (or DSV3_BACKEND)")
    return found[0] if found else cpu_chip()


def probe_device(vendor: str, device, torch_module: ModuleType | None = None) -> ChipInfo:
    """The chip of `vendor` ("nvidia" or "amd") at torch device `device` ("cuda:N"), with DSV3_FP8_MAX applied
    as selection applies it.

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
    chip = platform(vendor).probe(torch_module, index=index)
    if chip.fp8_format is not None and os.environ.get(fp8.FP8_MAX_ENV):
        chip = dataclasses.replace(chip, fp8_max=fp8.activation_max(chip.fp8_format, os.environ))
    return chip
