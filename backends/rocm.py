"""The ROCm backend: AMD Instinct GPUs through a ROCm build of PyTorch (device "cuda", RCCL as "nccl").

It runs the CUDA backend's ops (it subclasses CudaBackend), that is the shared Triton kernels of
backends/triton_kernels, with AMD tile configurations (amd_configs.py) and AMD FP8 numerics:

- gfx942 (MI300X, MI325X) has e4m3fnuz only. FP8 weights are converted at load: the e4m3fn
  bits are reinterpreted, the pattern 0x80 (-0 in fn, NaN in fnuz) becomes 0 and every weight
  scale is doubled (fnuz's exponent bias is one larger). Activations are quantized to a max of
  224 by default (vLLM's and SGLang's choice; 240 is the format's max): the fp8_max argument or
  DSV3_FNUZ_ACT_MAX changes it.
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
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping

import torch
from dsv3.backends import fp8
from dsv3.backends.chips import FP8_ACTIVATION_MAX, ChipInfo, describe_chip
from dsv3.backends.cuda import CudaBackend, _load_mla
from dsv3.backends.interface import Capabilities, LinearWeight, Precision
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.triton_kernels import amd_configs

from dsv3.errors import Dsv3Error

#: the largest finite value of each FP8 format, the bound for an activation max
FORMAT_MAX = {"e4m3fn": 448.0, "e4m3fnuz": 240.0}
#: the smallest M of the probe products (aligned to every library's tiles)
_PROBE_SHAPE = (32, 256, 384)


def probe_chip(device: torch.device, torch_module: ModuleType = torch) -> ChipInfo:
    """Describe the AMD GPU at `device` from its gcnArchName (e.g. "gfx942:sramecc+:xnack-").

    Args:
        device: a "cuda" device of a ROCm build of PyTorch.
        torch_module: torch, or a fake with the same attributes (tests).
    Raises:
        ValueError: not a ROCm build, or no GPU visible.
    """
    if getattr(torch_module.version, "hip", None) is None:
        raise ValueError("the rocm backend needs a ROCm build of PyTorch (torch.version.hip is None); "
                         "this torch is built for CUDA or the CPU")
    cuda = torch_module.cuda
    if not cuda.is_available() or cuda.device_count() < 1:
        raise ValueError("the rocm backend found no AMD GPU (torch.cuda.is_available() is False)")
    index = device.index if device.index is not None else cuda.current_device()
    props = cuda.get_device_properties(index)
    return describe_chip("amd", str(props.gcnArchName), name=str(props.name), memory_bytes=int(props.total_memory),
                         count=cuda.device_count())


def activation_max(chip: ChipInfo, fp8_max: float | None = None, env: Mapping[str, str] | None = None) -> float | None:
    """The value an activation block's amax maps to, or None for a chip without FP8.

    Order: the fp8_max argument, then DSV3_FNUZ_ACT_MAX (e4m3fnuz only), then the chip's
    (DSV3_FP8_MAX at selection), then 224 for e4m3fnuz and 448 for e4m3fn.

    Raises:
        Dsv3Error: a value that is not a number in (0, the format's max].
    """
    fmt = chip.fp8_format
    if fmt is None:
        return None
    env = os.environ if env is None else env
    if fp8_max is not None:
        value, source = fp8_max, "fp8_max"
    elif fmt == "e4m3fnuz" and env.get("DSV3_FNUZ_ACT_MAX"):
        value, source = env["DSV3_FNUZ_ACT_MAX"], "DSV3_FNUZ_ACT_MAX"
    else:
        value, source = chip.fp8_max or FP8_ACTIVATION_MAX[fmt], "the chip's default"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0 < number <= FORMAT_MAX[fmt]:
        raise Dsv3Error(f"{source}={value}: expected a number in (0, {FORMAT_MAX[fmt]:g}] for {fmt} activations")
    return number


# ---- AMD libraries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Libraries:
    """The library GEMMs found for FP8 linears of large M, and a line per library for Capabilities.ops.

    Attributes:
        aiter: the aiter module when its gemm_a8w8_blockscale matched the block math, else None.
        aiter_scale_layout: "column" (the [M, K/128] scales as quantized) or "row" (made contiguous).
        scaled_mm_scale_b: how torch._scaled_mm takes the weight scales ("view"/"contiguous"), or None.
        notes: one line per library saying whether it runs and why.
    """

    aiter: ModuleType | None = None
    aiter_scale_layout: str | None = None
    scaled_mm_scale_b: str | None = None
    notes: tuple[str, ...] = ()


def matches_block_math(gemm: Callable, fp8_dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether gemm(a, a_scale, w, w_scale) computes the 1x128 / 128x128 block-scaled product.

    Runs one small product with uneven scales (a per-tensor or per-row shortcut is off by tens of
    percent); an exception counts as no.

    Args:
        gemm: (a [M, K] FP8, a_scale [M, K/128] column-major, w [N, K] FP8, w_scale [N/128, K/128]) -> [M, N].
        fp8_dtype: the FP8 dtype of a and w.
        device: where to run it.
    """
    m, n, k = _PROBE_SHAPE
    g = torch.Generator(device).manual_seed(0)
    a = (torch.randn(m, k, device=device, generator=g) * 8).to(fp8_dtype)
    w = (torch.randn(n, k, device=device, generator=g) * 8).to(fp8_dtype)
    a_scale = (torch.rand(k // fp8.BLOCK, m, device=device, generator=g) + 0.5).t()
    w_scale = torch.rand(n // fp8.BLOCK, k // fp8.BLOCK, device=device, generator=g) + 0.5
    expected = ((a.float() * a_scale.repeat_interleave(fp8.BLOCK, 1))
                @ (w.float() * fp8.expand_block_scales(w_scale, n, k)).T)
    try:
        got = gemm(a, a_scale, w, w_scale).float()
    except Exception:  # noqa: BLE001 - a library that cannot run this case is simply not used
        return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-2,
                                                          atol=1e-2 * expected.abs().max().item())


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
    elif hasattr(torch, "_scaled_mm"):
        for layout in ("view", "contiguous"):
            def run(a, sa, w, sw, layout=layout):
                scale_b = sw.t() if layout == "view" else sw.t().contiguous()
                return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=scale_b, out_dtype=torch.bfloat16)
            if matches_block_math(run, fp8_dtype, device):
                scaled_mm = layout
                break
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
        if matches_block_math(run, fp8_dtype, device):
            notes.append(f"aiter gemm_a8w8_blockscale: matched the block math ({layout}-major activation scales)")
            return Libraries(aiter=aiter, aiter_scale_layout=layout)
    notes.append("aiter gemm_a8w8_blockscale: did not match the block math here, not used")
    return Libraries()


# ---- the backend ----------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class RocmBackend(CudaBackend):
    """Backend for AMD Instinct GPUs: the CUDA backend's ops with AMD tiles and FP8 formats.

    Args:
        device: "cuda" or "cuda:N" (ROCm PyTorch's name for AMD GPUs); "cpu" only under
            TRITON_INTERPRET=1 (an emulation).
        chip: the GPU's description; probed from gcnArchName when None (must be AMD).
        fp8_max: activation max (default 224 on e4m3fnuz, 448 on e4m3fn; DSV3_FNUZ_ACT_MAX also sets it).
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
        aiter: use aiter where it is installed and checks out (None: unless DSV3_ROCM_AITER=0).
    """

    def __init__(self, device: str | None = None, chip: ChipInfo | None = None, fp8_max: float | None = None,
                 ue8m0: bool = False, aiter: bool | None = None):
        device = torch.device(device or "cuda")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise ValueError(f"the rocm backend needs a cuda device (ROCm PyTorch's name for AMD GPUs), got {device}"
                             " (the CPU only under TRITON_INTERPRET=1)")
        chip = chip or probe_chip(device)
        if chip.vendor != "amd":
            raise ValueError(f"the rocm backend runs on AMD GPUs, got a {chip.vendor} {chip.arch}")
        on_gpu = device.type == "cuda" and torch.cuda.is_available() and not _interpreting()
        on_amd = on_gpu and torch.version.hip is not None
        self.chip, self.ue8m0 = chip, ue8m0
        self.arch = amd_configs.base_arch(chip.arch)
        self.amd_launch = on_amd
        self.configs = amd_configs.kernel_configs(self.arch, amd_launch=on_amd)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count if on_gpu
                        else 4 if device.type == "cpu" else amd_configs.COMPUTE_UNITS.get(self.arch, 304))
        fp8_dtype = fp8.FP8_FORMATS.get(chip.fp8_format) if chip.fp8_format else None
        act_max = activation_max(chip, fp8_max)
        self._reference = ReferenceBackend(device)
        self._mla = _load_mla()
        env = dict(os.environ) if aiter is None else {**os.environ, "DSV3_ROCM_AITER": "1" if aiter else "0"}
        self.libraries = detect_libraries(device, fp8_dtype, probe=on_amd, env=env)
        self._scaled_mm_scale_b = self.libraries.scaled_mm_scale_b
        self._scaled_mm_pad_n = self._scaled_mm_scale_b is not None  # pad N to 128 where it is used: always safe
        self._graph_pool = self._graph_stream = None  # made on the first graph_runner call (HIP graphs on ROCm)
        self._graphs = weakref.WeakSet()  # the live graphs recorded in _graph_pool
        self.emulation = None if on_amd else self._emulation_note(device, on_gpu)
        self.capabilities = Capabilities(
            name="rocm",
            device=str(device),
            fp8_dtype=fp8_dtype,
            fp8_max=act_max,
            dist_backend="gloo" if device.type == "cpu" else "nccl",
            native_fp8=fp8_dtype is not None,
            ops=self._describe_ops(fp8_dtype, act_max),
        )

    def _emulation_note(self, device: torch.device, on_gpu: bool) -> str:
        where = ("the CPU under TRITON_INTERPRET=1" if device.type == "cpu" else
                 f"{torch.cuda.get_device_name(device)} (not an AMD GPU)" if on_gpu else "no GPU (nothing runs)")
        fmt = self.chip.fp8_format or "no FP8"
        return (f"the Triton kernels with {self.arch} tiles, without AMD-only launch settings, "
                f"in {fmt}, on {where}")

    def _describe_ops(self, fp8_dtype: torch.dtype | None, act_max: float | None) -> dict[str, str]:
        tiles = f"{self.arch} tiles"
        c = self.configs
        if fp8_dtype is None:
            linear_fp8 = f"unavailable on {self.arch} (no FP8): FP8 checkpoints run dequantized to BF16"
        else:
            fmt = str(fp8_dtype).removeprefix("torch.float8_")
            converted = ", weights converted from e4m3fn at load (0x80 -> 0, scales x2)" if fmt == "e4m3fnuz" else ""
            linear_fp8 = (f"triton 1x128 quant to {fmt} (max {act_max:g}){converted}; triton fp8 gemm, {tiles}: "
                          f"split-K {c.gemm_decode.block_m}x{c.gemm_decode.block_n} for M <= {c.decode_max_m}, "
                          f"{c.gemm_prefill.block_m}x{c.gemm_prefill.block_n} above")
            if self.libraries.aiter is not None:
                linear_fp8 += f"; aiter gemm_a8w8_blockscale for M >= {c.scaled_mm_min_m}"
            elif self._scaled_mm_scale_b:
                linear_fp8 += f"; torch._scaled_mm block-wise for M >= {c.scaled_mm_min_m}"
            linear_fp8 += f" [{'; '.join(self.libraries.notes)}; library speed not timed by dsv3]"
        few, many = (amd_configs.mla_decode_config(self.arch, heads, torch.bfloat16) for heads in (16, 128))
        mla = "triton (backends/triton_kernels/mla.py)" if self._mla else "reference fallback (torch)"
        return {
            "linear_fp8": linear_fp8,
            "linear_bf16": "torch F.linear (hipBLASLt on ROCm)",
            "rms_norm": f"triton (residual add fused; the 1x128 quantization too where FP8 linears read it), {tiles}",
            "rotary": "triton (one launch, fp32 math)",
            "swiglu": "triton (one launch)",
            "mla_prefill": f"{mla}: latents expanded, torch SDPA",
            "mla_decode": (f"{mla}: split flash-decoding, {tiles} ({few.block_h} or {many.block_h} heads x "
                           f"{few.block_n} tokens), rope and the cache write in the kernel; aiter MLA not used "
                           "(its paged cache layout differs)"),
            "moe_route": "fp32 router GEMM (hipBLASLt), then one triton routing kernel",
            "moe_experts": (f"triton grouped GEMM, {tiles} ({c.moe_decode.block_m} or {c.moe_prefill.block_m} rows): "
                            "gate+up with SwiGLU (and FP8 quant) fused, down with weighted atomic combine; "
                            "aiter fused_moe not used (its weight layout differs)"),
        }

    # ---- weight preparation ------------------------------------------------

    def _to_fp8(self, weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in this chip's FP8 format with its block scales: e4m3fn converted to e4m3fnuz on gfx942."""
        dtype = self.capabilities.fp8_dtype
        if dtype is None:
            raise ValueError(f"precision fp8: {self.arch} has no FP8 (use bf16)")
        if scale is None:
            return fp8.quantize_blocks(weight, dtype)
        if weight.dtype == torch.float8_e4m3fn and dtype == torch.float8_e4m3fnuz:
            weight, scale = fp8.fn_to_fnuz(weight, scale)
        elif weight.dtype != dtype:
            raise Dsv3Error(f"FP8 weight of dtype {weight.dtype}: the rocm backend on {self.arch} takes "
                            f"float8_e4m3fn (the checkpoint's) or {dtype}")
        return weight.contiguous(), scale.contiguous()

    def prepare_linear(self, weight, scale_inv, precision: Precision) -> LinearWeight:
        prepared = super().prepare_linear(weight, scale_inv, precision)
        if (prepared.is_fp8 and self.libraries.aiter is not None
                and prepared.out_features % fp8.BLOCK == 0 and prepared.in_features % fp8.BLOCK == 0):
            prepared.extra["aiter"] = True
        return prepared

    # ---- GEMM --------------------------------------------------------------

    def _uses_aiter(self, m: int, weight: LinearWeight, out_dtype: torch.dtype) -> bool:
        return (m >= self.configs.scaled_mm_min_m and "aiter" in weight.extra
                and out_dtype in (torch.bfloat16, torch.float16))

    def linear_impl(self, m: int, weight: LinearWeight) -> str:
        if self._uses_aiter(m, weight, torch.bfloat16):
            return "aiter gemm_a8w8_blockscale"
        return super().linear_impl(m, weight)

    def fp8_gemm(self, qa: torch.Tensor, sa: torch.Tensor, weight: LinearWeight,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if self._uses_aiter(qa.shape[0], weight, out_dtype):
            scales = sa if self.libraries.aiter_scale_layout == "column" else sa.contiguous()
            return self.libraries.aiter.gemm_a8w8_blockscale(qa, weight.weight, scales, weight.scale, dtype=out_dtype)
        return super().fp8_gemm(qa, sa, weight, out_dtype)

    # ---- MLA ---------------------------------------------------------------

    def mla_decode(self, q_nope, q_pe, latent, k_pe, cache, slots, positions, weights, softmax_scale, rope=None):
        if self._mla is None:
            return super().mla_decode(q_nope, q_pe, latent, k_pe, cache, slots, positions, weights, softmax_scale,
                                      rope)
        config = amd_configs.mla_decode_config(self.arch, q_nope.shape[1], cache.dtype, self.amd_launch)
        return self._mla.mla_decode(q_nope, q_pe, latent, k_pe, cache, slots, positions, weights, softmax_scale,
                                    config=config, rope=rope)

    # ---- graphs ------------------------------------------------------------

    def graph_runner(self, step):
        """HIP graphs through torch.cuda.graph on an AMD GPU (as the CUDA backend records them); none on the
        CPU interpreter."""
        if self.device.type != "cuda":
            return None
        return super().graph_runner(step)
