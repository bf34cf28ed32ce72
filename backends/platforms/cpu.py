"""The host CPU: the reference backend (plain PyTorch), also the fallback wherever a vendor backend
cannot run."""

from __future__ import annotations

import os
import platform

from dsv3.backends.platforms.base import ChipInfo, Platform


class CpuPlatform(Platform):
    def probe(self, torch_module=None, find_spec=None, import_module=None) -> ChipInfo:
        """The host CPU (always there): its model name and physical memory."""
        return self.describe("cpu", name=cpu_name(), memory_bytes=host_memory_bytes(), count=1)


CPU = CpuPlatform(vendor="cpu", backend="reference", backend_class="dsv3.backends.reference:ReferenceBackend",
                  torch_device="cpu", dist_backend="gloo")


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
