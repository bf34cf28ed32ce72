"""The CUDA backend: NVIDIA GPUs, FP8 on sm_89/sm_90 and newer, BF16 on sm_80.

The ops are the shared Triton backend's (backends/triton_backend.py, MLA included); this module
supplies NVIDIA's facts: the chip (probed from the compute capability), the sm_XY tile table
(triton_kernels/configs.py), OCP e4m3fn FP8 and torch._scaled_mm block-wise (cuBLAS) for FP8
linears of prefill-sized M where this torch and chip compute the block math with it (checked once
at start).
"""

from __future__ import annotations

import torch
from dsv3.backends import fp8
from dsv3.backends.errors import BackendUnavailable
from dsv3.backends.platforms import NVIDIA, ChipInfo, probe_device
from dsv3.backends.triton_backend import TritonBackend, check_scaled_mm


class CudaBackend(TritonBackend):
    """Backend for NVIDIA GPUs.

    Args:
        device: a CUDA device ("cuda", "cuda:1"); "cuda" by default.
        chip: the GPU's description; probed from the device when None (must be NVIDIA).
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
    """

    def __init__(self, device: str | None = None, chip: ChipInfo | None = None, ue8m0: bool = False):
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise BackendUnavailable(f"the cuda backend needs a cuda device, got {device}")
        chip = chip or probe_device("nvidia", device)
        if chip.vendor != "nvidia":
            raise BackendUnavailable(f"the cuda backend runs on NVIDIA GPUs, got a {chip.vendor} {chip.arch}")
        on_gpu = torch.cuda.is_available()
        fp8_dtype = fp8.FP8_FORMATS.get(chip.fp8_format) if chip.fp8_format == "e4m3fn" else None
        super().__init__(
            NVIDIA, device, chip,
            num_sms=(torch.cuda.get_device_properties(device).multi_processor_count if on_gpu
                     else NVIDIA.num_compute_units(chip.arch)),
            fp8_dtype=fp8_dtype, fp8_max=chip.fp8_max, ue8m0=ue8m0,
            scaled_mm=check_scaled_mm(device, fp8_dtype) if on_gpu and fp8_dtype is not None else None)
