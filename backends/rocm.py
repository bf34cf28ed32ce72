"""The ROCm backend: AMD Instinct GPUs through a ROCm build of PyTorch (device "cuda", RCCL as "nccl").

It runs the shared Triton backend's ops (backends/triton_backend.py, as the CUDA backend does), that is
the kernels of backends/triton_kernels, with AMD tile configurations (amd_configs.py) and AMD FP8 numerics:

- gfx942 (MI300X, MI325X) has e4m3fnuz only. FP8 weights are converted at load: the e4m3fn
  bits are reinterpreted, the pattern 0x80 (-0 in fn, NaN in fnuz) becomes 0 and every weight
  scale is doubled (fnuz's exponent bias is one larger). Activations are quantized to a max of
  224 by default (vLLM's and SGLang's choice; 240 is the format's max): the fp8_max argument or
  DSV3_FP8_MAX changes it.
- gfx950 (MI355X) has OCP e4m3fn, as on NVIDIA: the checkpoint's weights are used as they are.
- older CDNA (gfx90a, MI200) has no FP8: FP8 checkpoints run dequantized to BF16.

The arch comes from gcnArchName, never from the capability number (AMD reports (9, 4)).

AMD libraries: where aiter is installed (or torch._scaled_mm takes 1x128/128x128 block scales),
the FP8 GEMM of prefill-sized M uses it, once a small block-scaled product at start-up has
matched the block math; the Triton kernels are the path that is always there. dsv3 has not
timed either library (no AMD GPU was at hand): `dsv3 bench gemm` on an MI300X compares them,
and DSV3_ROCM_AITER=0 turns aiter off. Capabilities.ops says what runs.

The backend does no device work until it has a device: built with a described chip on a
machine without an AMD GPU it only fills in its capabilities (tests, `dsv3 doctor` style
reports). Off AMD hardware it runs as an emulation: on the CPU under TRITON_INTERPRET=1, or on
an NVIDIA GPU with OCP FP8, in both cases without the AMD-only launch settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping

import torch
from dsv3.backends import fp8
from dsv3.backends.errors import BackendUnavailable
from dsv3.backends.platforms import AMD, ChipInfo, probe_device
from dsv3.backends.triton_backend import ScaledMM, TritonBackend, VendorGemm, check_scaled_mm, matches_block_math

#: the (M, N, K) of the aiter check product (aligned to every library's tiles)
_PROBE_SHAPE = (32, 256, 384)


def activation_max(chip: ChipInfo, fp8_max: float | None = None) -> float | None:
    """The value an activation block's amax maps to, or None for a chip without FP8.

    Order: the fp8_max argument, then the chip's (DSV3_FP8_MAX where set, else the FP8 table's: 224 for
    e4m3fnuz, 448 for e4m3fn).

    Raises:
        BackendError: a value that is not a number in (0, the format's max].
    """
    fmt = chip.fp8_format
    if fmt is None:
        return None
    if fp8_max is not None:
        return fp8.check_fp8_max(fp8_max, fmt, "fp8_max")
    return fp8.check_fp8_max(chip.fp8_max or fp8.FP8_ACTIVATION_MAX[fmt], fmt, "the chip's activation max")


# ---- AMD libraries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Libraries:
    """The library GEMMs found for FP8 linears of large M, and a line per library for Capabilities.ops.

    Attributes:
        aiter: the aiter module when its gemm_a8w8_blockscale matched the block math, else None.
        aiter_scale_layout: "column" (the [M, K/128] scales as quantized) or "row" (made contiguous).
        scaled_mm: how torch._scaled_mm takes the weight scales, where it matched the block math, or None.
        notes: one line per library saying whether it runs and why.
    """

    aiter: ModuleType | None = None
    aiter_scale_layout: str | None = None
    scaled_mm: ScaledMM | None = None
    notes: tuple[str, ...] = ()

    def vendor_gemm(self) -> VendorGemm | None:
        """aiter's gemm_a8w8_blockscale as the backend's vendor GEMM, where it matched."""
        if self.aiter is None:
            return None
        gemm, column = self.aiter.gemm_a8w8_blockscale, self.aiter_scale_layout == "column"

        def run(qa, sa, w, w_scale, out_dtype):
            return gemm(qa, w, sa if column else sa.contiguous(), w_scale, dtype=out_dtype)

        return VendorGemm("aiter gemm_a8w8_blockscale", run)


def detect_libraries(device: torch.device | str, fp8_dtype: torch.dtype | None, probe: bool,
                     env: Mapping[str, str] | None = None, find_spec: Callable = importlib.util.find_spec,
                     import_module: Callable = importlib.import_module) -> Libraries:
    """Find aiter and torch._scaled_mm block-wise for the FP8 GEMM, and check each on `device`.

    Args:
        device: the device to check them on.
        fp8_dtype: the backend's FP8 dtype (None: no FP8, nothing to find).
        probe: run the check products (False where there is no AMD GPU: then nothing is used).
        env: DSV3_ROCM_AITER=0 turns aiter off.
        find_spec, import_module: importlib's functions, or fakes (tests).
    """
    if fp8_dtype is None:
        return Libraries(notes=("no FP8 on this chip: library FP8 GEMMs not used",))
    env = os.environ if env is None else env
    found = Libraries()
    notes = []
    if env.get("DSV3_ROCM_AITER", "1") == "0":
        notes.append("aiter: turned off (DSV3_ROCM_AITER=0)")
    elif find_spec("aiter") is None:
        notes.append("aiter: not installed")
    elif not probe:
        notes.append("aiter: installed, not used (no AMD GPU to check it on)")
    else:
        found = _check_aiter(device, fp8_dtype, import_module, notes)
    scaled_mm = None
    if not probe:
        notes.append("torch._scaled_mm block-wise: not checked (no AMD GPU)")
    else:
        scaled_mm = check_scaled_mm(device, fp8_dtype)
        notes.append("torch._scaled_mm block-wise: " + ("matched the block math" if scaled_mm
                                                        else "absent or wrong for 1x128/128x128 scales here"))
    return Libraries(found.aiter, found.aiter_scale_layout, scaled_mm, tuple(notes))


def _check_aiter(device, fp8_dtype, import_module: Callable, notes: list[str]) -> Libraries:
    try:
        aiter = import_module("aiter")
    except Exception as e:  # noqa: BLE001 - aiter's import can fail in many ways on a mismatched ROCm
        notes.append(f"aiter: installed but failed to import ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        return Libraries()
    gemm = getattr(aiter, "gemm_a8w8_blockscale", None)
    if gemm is None:
        notes.append("aiter: installed, no gemm_a8w8_blockscale")
        return Libraries()
    for layout in ("column", "row"):
        def run(a, sa, w, sw, layout=layout):
            return gemm(a, w, sa if layout == "column" else sa.contiguous(), sw, dtype=torch.bfloat16)
        if matches_block_math(run, fp8_dtype, device, _PROBE_SHAPE):
            notes.append(f"aiter gemm_a8w8_blockscale: matched the block math ({layout}-major activation scales)")
            return Libraries(aiter=aiter, aiter_scale_layout=layout)
    notes.append("aiter gemm_a8w8_blockscale: did not match the block math here, not used")
    return Libraries()


# ---- the backend ----------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class RocmBackend(TritonBackend):
    """Backend for AMD Instinct GPUs: the shared Triton ops with AMD tiles, FP8 formats and libraries.

    Args:
        device: "cuda" or "cuda:N" (ROCm PyTorch's name for AMD GPUs); "cpu" only under
            TRITON_INTERPRET=1 (an emulation).
        chip: the GPU's description; probed from gcnArchName when None (must be AMD).
        fp8_max: activation max (default the chip's: 224 on e4m3fnuz, 448 on e4m3fn, or DSV3_FP8_MAX).
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
        aiter: use aiter where it is installed and checks out (None: unless DSV3_ROCM_AITER=0).
    """

    blas = "hipBLASLt"

    def __init__(self, device: str | None = None, chip: ChipInfo | None = None, fp8_max: float | None = None,
                 ue8m0: bool = False, aiter: bool | None = None):
        device = torch.device(device or "cuda")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise BackendUnavailable(f"the rocm backend needs a cuda device (ROCm PyTorch's name for AMD GPUs), "
                                     f"got {device} (the CPU only under TRITON_INTERPRET=1)")
        chip = chip or probe_device("amd", device)
        if chip.vendor != "amd":
            raise BackendUnavailable(f"the rocm backend runs on AMD GPUs, got a {chip.vendor} {chip.arch}")
        on_gpu = device.type == "cuda" and torch.cuda.is_available() and not _interpreting()
        on_amd = on_gpu and torch.version.hip is not None
        self.arch = AMD.base_arch(chip.arch)
        self.amd_launch = on_amd
        fp8_dtype = fp8.FP8_FORMATS.get(chip.fp8_format) if chip.fp8_format else None
        env = dict(os.environ) if aiter is None else {**os.environ, "DSV3_ROCM_AITER": "1" if aiter else "0"}
        self.libraries = detect_libraries(device, fp8_dtype, probe=on_amd, env=env)
        self.emulation = None if on_amd else self._emulation_note(chip, device, on_gpu)
        num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if on_gpu
                   else 4 if device.type == "cpu" else AMD.num_compute_units(self.arch))
        converted = ("weights converted from e4m3fn at load (0x80 -> 0, scales x2)"
                     if fp8_dtype == torch.float8_e4m3fnuz else None)
        self.op_notes = {
            "linear_fp8": tuple(filter(None, (converted, *self.libraries.notes, "library speed not timed by dsv3")))
            if fp8_dtype is not None else (),
            "mla_decode": ("aiter MLA not used (its paged cache layout differs)",),
            "moe_experts": ("aiter fused_moe not used (its weight layout differs)",),
        }
        # where torch._scaled_mm is used, N is padded to 128: always safe, and not checked on AMD hardware
        scaled_mm = self.libraries.scaled_mm and ScaledMM(self.libraries.scaled_mm.scale_layout, pad_n=True)
        super().__init__(AMD, device, chip, num_sms, fp8_dtype, activation_max(chip, fp8_max), ue8m0, scaled_mm,
                         vendor_gemm=self.libraries.vendor_gemm(), native=on_amd)

    def _emulation_note(self, chip: ChipInfo, device: torch.device, on_gpu: bool) -> str:
        where = ("the CPU under TRITON_INTERPRET=1" if device.type == "cpu" else
                 f"{torch.cuda.get_device_name(device)} (not an AMD GPU)" if on_gpu else "no GPU (nothing runs)")
        fmt = chip.fp8_format or "no FP8"
        return (f"the Triton kernels with {self.arch} tiles, without AMD-only launch settings, "
                f"in {fmt}, on {where}")
