"""Tile sizes and launch settings of the shared Triton kernels on AMD Instinct GPUs, per arch.

The same structures as configs.py (KernelConfigs of TileConfigs, DecodeConfig),
so the kernels take them unchanged. What differs from the NVIDIA tables:

- A wavefront is 64 lanes, so num_warps=4 is 256 threads and num_warps=8 is 512 (the most
  a workgroup may have): 4 waves fill the 4 SIMDs of a compute unit (CU).
- Tiles are multiples of the MFMA shapes: matrix_instr_nonkdim=16 asks for 16x16 MFMA
  (v_mfma_f32_16x16x32_fp8_fp8 on gfx942 for e4m3fnuz, the f8f6f4 family on gfx950 for
  e4m3fn), which suits the 16-row decode tiles; kpack=2 packs two K steps per operand load
  on gfx942 (Triton ignores it from gfx950 on, so it is left out there).
- The local data share (LDS) is 64 KiB per CU on gfx942 (and gfx90a) and 160 KiB on gfx950.
  Each SIMD lane has 512 VGPRs on gfx942/gfx950 (a workgroup of 8 waves gets at most 256 each),
  and 256 plus 256 accumulation-only registers on gfx90a. With num_stages=2 Triton's AMD
  pipeliner keeps one LDS buffer per operand on gfx942 (a 128x128 FP8 GEMM tile takes 32 KiB)
  and two on gfx950. waves_per_eu asks the compiler for that many waves per SIMD (it caps
  registers at 512 / waves_per_eu); 0 leaves it free.

These are starting points chosen for the hardware limits above and checked by compiling
every kernel for gfx942 and gfx950 with Triton's AMD backend on a CPU (tests/test_rocm_backend.py:
fp8 MFMA instructions present, LDS within the CU's, no register spills). They were not timed
on an AMD GPU; `dsv3 bench gemm|mla|moe` on one is how to tune them.

waves_per_eu, matrix_instr_nonkdim and kpack exist only in Triton's AMD backend: NVIDIA's
rejects unknown launch keywords and the CPU interpreter cannot take them, so
`kernel_configs(arch, amd_launch=False)` drops them for runs that are not on an AMD GPU.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from dsv3.backends.triton_kernels.configs import (
    NVIDIA_SM90,
    DecodeConfig,
    KernelConfigs,
    TileConfig,
    default_decode_config,
)

#: launch keywords that only Triton's AMD (HIP) backend accepts
AMD_ONLY_LAUNCH_KEYS: tuple[str, ...] = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")

#: LDS bytes per CU, the budget every kernel's tiles must fit
LDS_BYTES = {"gfx942": 64 * 1024, "gfx950": 160 * 1024, "gfx90a": 64 * 1024}


def _mfma(num_warps: int, num_stages: int = 2, waves_per_eu: int = 0, kpack: int | None = 2) -> dict:
    """Launch keywords of a kernel built around tl.dot."""
    launch = {"num_warps": num_warps, "num_stages": num_stages, "waves_per_eu": waves_per_eu,
              "matrix_instr_nonkdim": 16}
    if kpack is not None:
        launch["kpack"] = kpack
    return launch


# MI300X / MI325X (CDNA3): FP8 e4m3fnuz, 304 CUs, 64 KiB LDS per CU. Built on the NVIDIA table so that
# a field added there later has a value here too.
GFX942 = replace(
    NVIDIA_SM90,
    # 128x128 output, K block 128: A and B tiles 16 KiB each in LDS; 8 waves, 32 fp32 accumulators a lane.
    gemm_prefill=TileConfig(128, 128, 8, _mfma(num_warps=8, waves_per_eu=2)),
    # decode: 16-row tiles (one MFMA high), 64 columns so that more programs stream the weight.
    gemm_decode=TileConfig(16, 64, 1, _mfma(num_warps=4)),
    decode_max_m=64,
    # library GEMMs (aiter, torch._scaled_mm), where found, only past the decode range: untimed on AMD.
    scaled_mm_min_m=65,
    # grouped MoE: the gate and up tiles (2 x 16 KiB) and the token tile stay under 64 KiB; 8 waves keep
    # the 64-row tile's two accumulators without spilling.
    moe_decode=TileConfig(16, 128, 1, _mfma(num_warps=4)),
    moe_prefill=TileConfig(64, 128, 8, _mfma(num_warps=8)),
    moe_prefill_min_rows=32,
    # the BF16 MoE's gate and up tiles alone are 64 KiB: at num_stages=2 its gate/up kernel needs 68-80 KiB
    # of LDS, more than a CU has; at 1 it needs 32 KiB.
    moe_dense_max_stages=1,
    quant=TileConfig(8, 128, 1, {"num_warps": 4}),
    norm=TileConfig(16, 1024, 1, {"num_warps": 8}),  # the H100's (not timed on an AMD chip)
)

# MI355X (CDNA4): OCP FP8 e4m3fn, 256 CUs, 160 KiB LDS per CU. Its pipeliner double-buffers at
# num_stages=2, so the tiles stay those of gfx942 (a 256-row GEMM tile spills registers where K is
# not a multiple of 128); kpack is not used there.
GFX950 = replace(
    GFX942,
    gemm_prefill=TileConfig(128, 128, 8, _mfma(num_warps=8, kpack=None)),
    gemm_decode=TileConfig(16, 64, 1, _mfma(num_warps=4, kpack=None)),
    moe_decode=TileConfig(16, 128, 1, _mfma(num_warps=4, kpack=None)),
    moe_prefill=TileConfig(64, 128, 8, _mfma(num_warps=8, kpack=None)),
)

# MI200 (CDNA2) and other AMD chips without FP8: only the BF16 MoE and the norms run; CDNA2's
# LDS is 64 KiB as on gfx942, so its tiles apply.
CONFIGS: dict[str, KernelConfigs] = {"gfx942": GFX942, "gfx950": GFX950, "gfx90a": GFX942}

#: MLA decode (BF16/FP16 cache) per arch: (at most 16 heads, more heads). KV tiles of 32 tokens
#: (32 x 576 x 2 bytes = 36 KiB) fit gfx942's LDS, and the head blocks keep the fp32 accumulator
#: [block_h, 512] in registers without spilling (64-token tiles spill on both chips); gfx90a's
#: smaller register file takes 16-token tiles.
MLA_DECODE: dict[str, tuple[DecodeConfig, DecodeConfig]] = {
    "gfx942": (DecodeConfig(16, 32, num_warps=8, num_stages=1, launch={"matrix_instr_nonkdim": 16}),
               DecodeConfig(32, 32, num_warps=8, num_stages=1, launch={"matrix_instr_nonkdim": 16})),
    "gfx950": (DecodeConfig(16, 32, num_warps=4, num_stages=1, launch={"matrix_instr_nonkdim": 16}),
               DecodeConfig(32, 32, num_warps=8, num_stages=1, launch={"matrix_instr_nonkdim": 16})),
}
MLA_DECODE["gfx90a"] = (DecodeConfig(16, 16, num_warps=8, num_stages=1, launch={"matrix_instr_nonkdim": 16}),
                        DecodeConfig(32, 16, num_warps=8, num_stages=1, launch={"matrix_instr_nonkdim": 16}))


def without_amd_launch(launch: dict) -> dict:
    """A launch dict without the AMD-only keywords."""
    return {key: value for key, value in launch.items() if key not in AMD_ONLY_LAUNCH_KEYS}


def kernel_configs(arch: str, amd_launch: bool = True) -> KernelConfigs:
    """The AMD table for `arch` (gfx942's for an AMD arch not listed).

    Args:
        arch: "gfx942", "gfx950", "gfx90a" (without the feature flags gcnArchName carries: AMD.base_arch).
        amd_launch: keep waves_per_eu, matrix_instr_nonkdim and kpack; False for a run that is
            not on an AMD GPU (the CPU interpreter, an NVIDIA GPU), whose Triton rejects them.
    Returns:
        KernelConfigs in the structure of configs.py.
    """
    table = CONFIGS.get(arch, GFX942)
    if amd_launch:
        return table
    tiles = {name: replace(tile, launch=without_amd_launch(tile.launch))
             for name, tile in vars(table).items() if isinstance(tile, TileConfig)}
    return replace(table, **tiles)


def mla_decode_config(arch: str, num_heads: int, dtype: torch.dtype, amd_launch: bool = True) -> DecodeConfig:
    """The MLA decode tiles for `num_heads` query heads and a cache of `dtype` on `arch`.

    FP32 caches (tests, the CPU interpreter) take mla.py's own FP32 tiles.
    """
    if dtype == torch.float32:
        return default_decode_config(num_heads, dtype)
    few_heads, many_heads = MLA_DECODE.get(arch, MLA_DECODE["gfx942"])
    config = few_heads if num_heads <= 16 else many_heads
    return config if amd_launch else replace(config, launch=without_amd_launch(config.launch))
