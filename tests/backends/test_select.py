"""Backend selection over described devices: the backend, FP8 format and precision each chip gets.

decide() is pure, so every chip is described rather than present; the probe is
tested with fake torch modules shaped like a CUDA, ROCm, Ascend or CPU build.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError, BackendUnavailable
from dsv3.backends.interface import Capabilities
from dsv3.backends.platforms import (
    AMD,
    CPU,
    HUAWEI,
    NVIDIA,
    PLATFORMS,
    ascend_arch,
    describe_chip,
    platform,
    platform_of_backend,
    probe,
)
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.registry import BACKENDS
from dsv3.backends.select import build, decide, select

from dsv3.errors import Dsv3Error
from dsv3.precision import resolve_precision

#: the registry once every hardware backend is in (the convention the backend helpers follow)
FULL_REGISTRY = {
    "reference": ("dsv3.backends.reference", "ReferenceBackend", None),
    "cuda": ("dsv3.backends.cuda", "CudaBackend", "cuda"),
    "rocm": ("dsv3.backends.rocm", "RocmBackend", "rocm"),
    "ascend": ("dsv3.backends.ascend", "AscendBackend", "ascend"),
}
ALL_PACKAGES = frozenset({"triton", "torch_npu"})
GIB = 2**30

CHIPS = {
    "H100": describe_chip("nvidia", "sm_90", "NVIDIA H100 80GB HBM3", 80 * GIB, 8),
    "H800": describe_chip("nvidia", "sm_90", "NVIDIA H800", 80 * GIB, 8),
    "A100": describe_chip("nvidia", "sm_80", "NVIDIA A100-SXM4-80GB", 80 * GIB, 8),
    "MI300X": describe_chip("amd", "gfx942:sramecc+:xnack-", "AMD Instinct MI300X", 192 * GIB, 8),
    "MI355X": describe_chip("amd", "gfx950:sramecc+:xnack-", "AMD Instinct MI355X", 288 * GIB, 8),
    "910B": describe_chip("huawei", "ascend910b", "Ascend910B3", 64 * GIB, 8),
    "910C": describe_chip("huawei", "ascend910c", "Ascend910_9391", 64 * GIB, 16),
    "950": describe_chip("huawei", "ascend950", "Ascend950PR", 128 * GIB, 8),
    "CPU": describe_chip("cpu", "cpu", "Intel(R) Xeon(R)", 24 * GIB, 1),
}

# chip -> (backend, native FP8 format, activation max, precision auto picks for an FP8 checkpoint)
EXPECTED = {
    "H100": ("cuda", "e4m3fn", 448.0, "fp8"),
    "H800": ("cuda", "e4m3fn", 448.0, "fp8"),
    "A100": ("cuda", None, None, "bf16"),
    "MI300X": ("rocm", "e4m3fnuz", 224.0, "fp8"),
    "MI355X": ("rocm", "e4m3fn", 448.0, "fp8"),
    "910B": ("ascend", None, None, "bf16"),
    "910C": ("ascend", None, None, "bf16"),
    "950": ("ascend", "e4m3fn", 448.0, "fp8"),
    "CPU": ("reference", None, None, "bf16"),
}


def planned_capabilities(decision) -> Capabilities:
    """What the chosen backend reports, by the backends' shared convention: native FP8 exactly
    when the chip has an FP8 format (the reference backend only emulates, so never native)."""
    if decision.backend == "reference":
        return ReferenceBackend().capabilities
    fmt = decision.chip.fp8_format
    return Capabilities(name=decision.backend, device="accelerator", fp8_dtype=fp8.FP8_FORMATS.get(fmt),
                        fp8_max=decision.chip.fp8_max, dist_backend="nccl", native_fp8=fmt is not None)


@pytest.mark.parametrize("chip_name", list(CHIPS))
def test_auto_picks_backend_format_and_precision(chip_name):
    backend, fmt, fp8_max, precision = EXPECTED[chip_name]
    decision = decide(CHIPS[chip_name], "auto", {}, ALL_PACKAGES, FULL_REGISTRY)
    assert decision.backend == backend
    assert decision.native_fp8_format == fmt
    assert decision.chip.fp8_max == fp8_max
    assert decision.source == "auto"
    caps = planned_capabilities(decision)
    assert resolve_precision("auto", caps, checkpoint_fp8=True, chip=decision.chip)[0] == precision
    assert resolve_precision("auto", caps, checkpoint_fp8=False, chip=decision.chip)[0] == "bf16"


@pytest.mark.parametrize("chip_name", ["A100", "910B", "910C"])
def test_fp8_requested_on_a_chip_without_it_names_the_chip_and_the_fallback(chip_name):
    decision = decide(CHIPS[chip_name], "auto", {}, ALL_PACKAGES, FULL_REGISTRY)
    with pytest.raises(Dsv3Error) as e:
        resolve_precision("fp8", planned_capabilities(decision), checkpoint_fp8=True, chip=decision.chip)
    message = str(e.value)
    assert CHIPS[chip_name].name in message and CHIPS[chip_name].arch in message
    assert "--precision bf16" in message and "\n" not in message


def test_capability_numbers_never_decide_amd_features():
    # MI300X reports CUDA-style capability (9, 4); its FP8 is fnuz, from the arch name
    mi300x = CHIPS["MI300X"]
    assert (mi300x.vendor, mi300x.arch, mi300x.fp8_format) == ("amd", "gfx942", "e4m3fnuz")


def test_backend_argument_overrides_auto_and_the_environment():
    h100 = CHIPS["H100"]
    by_argument = decide(h100, "reference", {"DSV3_BACKEND": "cuda"}, ALL_PACKAGES, FULL_REGISTRY)
    assert (by_argument.backend, by_argument.source) == ("reference", "requested")
    assert by_argument.native_fp8_format is None
    caps = planned_capabilities(by_argument)
    assert resolve_precision("auto", caps, True, h100)[0] == "bf16"  # the reference backend only emulates FP8


def test_dsv3_backend_environment_variable_overrides_auto():
    decision = decide(CHIPS["MI300X"], "auto", {"DSV3_BACKEND": "reference"}, ALL_PACKAGES, FULL_REGISTRY)
    assert (decision.backend, decision.source) == ("reference", "DSV3_BACKEND")
    assert "DSV3_BACKEND=reference" in decision.reason
    assert decide(CHIPS["MI300X"], None, {"DSV3_BACKEND": "auto"}, ALL_PACKAGES, FULL_REGISTRY).backend == "rocm"


def test_named_backend_without_its_vendor_package_says_what_to_install():
    with pytest.raises(BackendUnavailable, match=r"needs triton: pip install 'dsv3\[cuda\]'"):
        decide(CHIPS["H100"], "cuda", {}, frozenset(), FULL_REGISTRY)
    with pytest.raises(BackendUnavailable, match=r"needs torch_npu: pip install 'dsv3\[ascend\]'"):
        decide(CHIPS["910B"], "auto", {"DSV3_BACKEND": "ascend"}, frozenset({"triton"}), FULL_REGISTRY)


def test_auto_without_the_vendor_package_falls_back_to_reference_on_the_same_device():
    decision = decide(CHIPS["H100"], "auto", {}, frozenset(), FULL_REGISTRY)
    assert (decision.backend, decision.device) == ("reference", "cuda")
    assert "pip install 'dsv3[cuda]'" in decision.reason
    ascend = decide(CHIPS["910B"], "auto", {}, frozenset({"triton"}), FULL_REGISTRY)
    assert (ascend.backend, ascend.device) == ("reference", "npu")
    assert "pip install 'dsv3[ascend]'" in ascend.reason


def test_backend_missing_from_the_registry_is_reported_not_a_crash():
    registry = {"reference": FULL_REGISTRY["reference"]}
    fallback = decide(CHIPS["MI300X"], "auto", {}, ALL_PACKAGES, registry)
    assert (fallback.backend, fallback.device) == ("reference", "cuda")
    assert "no rocm backend" in fallback.reason
    with pytest.raises(BackendUnavailable, match="no rocm backend"):
        decide(CHIPS["MI300X"], "rocm", {}, ALL_PACKAGES, registry)


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'tpu' \(DSV3_BACKEND=tpu\); choose auto, "):
        decide(CHIPS["CPU"], "auto", {"DSV3_BACKEND": "tpu"}, ALL_PACKAGES, FULL_REGISTRY)


def test_fp8_activation_max_is_configurable():
    decision = decide(CHIPS["MI300X"], "auto", {"DSV3_FP8_MAX": "240"}, ALL_PACKAGES, FULL_REGISTRY)
    assert decision.chip.fp8_max == 240.0
    with pytest.raises(BackendError, match="DSV3_FP8_MAX=300"):
        decide(CHIPS["MI300X"], "auto", {"DSV3_FP8_MAX": "300"}, ALL_PACKAGES, FULL_REGISTRY)
    assert decide(CHIPS["A100"], "auto", {"DSV3_FP8_MAX": "240"}, ALL_PACKAGES, FULL_REGISTRY).chip.fp8_max is None


def test_backend_module_that_does_not_import_falls_back_under_auto(monkeypatch):
    monkeypatch.setitem(BACKENDS, "rocm", ("dsv3.backends.no_such_module", "RocmBackend", "rocm"))
    decision = decide(CHIPS["MI300X"], "auto", {}, ALL_PACKAGES, BACKENDS)
    backend, built = build(decision)
    assert backend.capabilities.name == "reference" and backend.capabilities.device == "cuda"
    assert "dsv3.backends.no_such_module is missing" in built.reason
    with pytest.raises(BackendUnavailable, match="dsv3.backends.no_such_module is missing"):
        build(decide(CHIPS["MI300X"], "rocm", {}, ALL_PACKAGES, BACKENDS))


def test_select_on_a_cpu_builds_the_reference_backend():
    backend, decision = select("auto", chip=CHIPS["CPU"], env={})
    assert backend.capabilities.name == "reference" and backend.capabilities.device == "cpu"
    assert not backend.capabilities.native_fp8
    assert decision.reason.startswith("no accelerator found")


# ---- the probe, on fake torch modules ----------------------------------------------------------

def fake_torch(hip=None, capability=(9, 0), name="", arch="", count=0, memory=0, npu=None):
    props = SimpleNamespace(name=name, total_memory=memory, gcnArchName=arch)
    cuda = SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count,
                           get_device_capability=lambda index=0: capability,
                           get_device_properties=lambda index=0: props)
    torch = SimpleNamespace(version=SimpleNamespace(hip=hip, cuda=None if hip else "12.8"), cuda=cuda)
    if npu is not None:
        torch.npu = npu
    return torch


def no_npu(name):
    return None


def test_probe_nvidia_arch_from_capability():
    chip = probe(fake_torch(capability=(9, 0), name="NVIDIA H100 80GB HBM3", count=8, memory=80 * GIB), no_npu)
    assert (chip.vendor, chip.arch, chip.fp8_format, chip.count, chip.memory_bytes) == (
        "nvidia", "sm_90", "e4m3fn", 8, 80 * GIB)
    a100 = probe(fake_torch(capability=(8, 0), name="NVIDIA A100", count=1), no_npu)
    assert (a100.arch, a100.fp8_format) == ("sm_80", None)


def test_probe_amd_arch_from_gcn_name_not_from_capability():
    torch = fake_torch(hip="6.2", capability=(9, 4), name="AMD Instinct MI300X", arch="gfx942:sramecc+:xnack-",
                       count=8, memory=192 * GIB)
    chip = probe(torch, no_npu)
    assert (chip.vendor, chip.arch, chip.fp8_format, chip.fp8_max) == ("amd", "gfx942", "e4m3fnuz", 224.0)
    mi355 = probe(fake_torch(hip="7.0", capability=(9, 5), name="MI355X", arch="gfx950", count=1), no_npu)
    assert (mi355.arch, mi355.fp8_format) == ("gfx950", "e4m3fn")


def test_probe_cpu_when_no_device():
    chip = probe(fake_torch(count=0), no_npu)
    assert (chip.vendor, chip.arch, chip.fp8_format) == ("cpu", "cpu", None)


def fake_ascend(name, soc_id):
    npu = SimpleNamespace(is_available=lambda: True, device_count=lambda: 8, get_device_name=lambda index=0: name,
                          get_device_properties=lambda index=0: SimpleNamespace(total_memory=64 * GIB))

    def get_soc_version():
        if soc_id is None:
            raise AttributeError("no SoC id")
        return soc_id

    torch_npu = SimpleNamespace(_C=SimpleNamespace(_npu_get_soc_version=get_soc_version))
    return fake_torch(npu=npu), lambda module: object(), lambda module: torch_npu


@pytest.mark.parametrize("name, soc_id, arch, fp8_format", [
    ("Ascend910B3", 223, "ascend910b", None),
    ("Ascend910_9391", 250, "ascend910c", None),
    ("Ascend910_9391", None, "ascend910c", None),
    ("Ascend950PR", 260, "ascend950", "e4m3fn"),
])
def test_probe_ascend_from_soc_id_or_name(name, soc_id, arch, fp8_format):
    torch, find_spec, import_module = fake_ascend(name, soc_id)
    chip = probe(torch, find_spec, import_module)
    assert (chip.vendor, chip.arch, chip.fp8_format, chip.count) == ("huawei", arch, fp8_format, 8)


def test_probe_skips_torch_npu_that_cannot_load_its_libraries():
    def broken(module):
        raise OSError("libascendcl.so: cannot open shared object file")

    chip = probe(fake_torch(count=0), lambda module: object(), broken)
    assert chip.vendor == "cpu"


def test_ascend_arch_names():
    assert ascend_arch("Ascend910B4") == "ascend910b"
    assert ascend_arch("Ascend910_9382") == "ascend910c"
    assert ascend_arch("Ascend910_9591") == "ascend950"
    assert ascend_arch("Ascend310P3") == "ascend310p3"


def test_probe_fails_loudly_when_two_platforms_match():
    """An Ascend NPU and an NVIDIA GPU in one machine: the probe names both and how to choose, and a
    backend asked for by name probes only its vendor's devices."""
    torch, find_spec, import_module = fake_ascend("Ascend910B3", 223)
    torch.cuda = fake_torch(capability=(9, 0), name="NVIDIA H100", count=2).cuda
    with pytest.raises(BackendUnavailable, match="found huawei ascend910b and nvidia sm_90 devices: choose one "
                                                 "with --backend ascend or cuda"):
        probe(torch, find_spec, import_module)
    assert probe(torch, find_spec, import_module, vendor="nvidia").arch == "sm_90"
    assert probe(torch, find_spec, import_module, vendor="huawei").arch == "ascend910b"


# ---- the platform records ----------------------------------------------------------------------

@pytest.mark.parametrize("record", PLATFORMS, ids=lambda p: p.vendor)
def test_each_platform_is_its_backend_entry(record):
    """The registry, the pip extras and auto selection all read the platform: one record per vendor."""
    module, cls, extra = BACKENDS[record.backend]
    assert f"{module}:{cls}" == record.backend_class and extra == record.pip_extra
    assert platform(record.vendor) is record and platform_of_backend(record.backend) is record
    chip = describe_chip(record.vendor, {"nvidia": "sm_90", "amd": "gfx942", "huawei": "ascend910b"}
                         .get(record.vendor, "cpu"))
    decision = decide(chip, "auto", {}, ALL_PACKAGES, FULL_REGISTRY)
    assert decision.backend == record.backend
    if record.pip_extra:  # without its packages auto runs the reference backend on the platform's device
        fallback = decide(chip, "auto", {}, frozenset(), FULL_REGISTRY)
        assert fallback.device == record.torch_device and f"dsv3[{record.pip_extra}]" in fallback.reason


def test_backends_take_their_mla_block_size_from_their_platform():
    assert ReferenceBackend().mla_block_size == CPU.mla_block_size == 64
    assert HUAWEI.mla_block_size == 128  # the block size both fused attention forms take
    pytest.importorskip("triton")
    from dsv3.backends.cuda import CudaBackend
    from dsv3.backends.rocm import RocmBackend

    assert CudaBackend("cuda", chip=describe_chip("nvidia", "sm_90")).mla_block_size == NVIDIA.mla_block_size == 64
    assert RocmBackend("cuda", chip=describe_chip("amd", "gfx942")).mla_block_size == AMD.mla_block_size == 64
