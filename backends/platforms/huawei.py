"""Huawei Ascend NPUs through torch_npu: the ascend backend (torch_npu's fused ops).

torch_npu is the one vendor module the probe imports: it is how an Ascend NPU is detected, and only
after importlib finds it installed.
"""

from __future__ import annotations

from dsv3.backends.platforms.base import ChipInfo, Platform

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


class HuaweiPlatform(Platform):
    def probe(self, torch_module, find_spec, import_module) -> ChipInfo | None:
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

    def fp8_format(self, arch: str) -> str | None:
        """910B and 910C have no FP8; Ascend 950 has e4m3fn."""
        return "e4m3fn" if self.base_arch(arch).startswith("ascend950") else None


HUAWEI = HuaweiPlatform(
    vendor="huawei", backend="ascend", backend_class="dsv3.backends.ascend:AscendBackend", torch_device="npu",
    dist_backend="hccl", pip_extra="ascend", packages=("torch_npu",),
    # the one block size both MLA forms of npu_fused_infer_attention_score take (16 or 128 at decode, 64 or
    # 128 at prefill: backends/ascend.py); at 64 decode would run the plain path
    mla_block_size=128)


def ascend_chip(npu, torch_npu, index: int = 0) -> ChipInfo:
    """NPU `index` described from torch_npu's device queries (`npu`: torch.npu or torch_npu.npu)."""
    name = str(npu.get_device_name(index))
    memory = getattr(npu.get_device_properties(index), "total_memory", 0)
    return HUAWEI.describe(ascend_arch(name, _soc_id(torch_npu)), name=name, memory_bytes=int(memory or 0),
                           count=npu.device_count())


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
