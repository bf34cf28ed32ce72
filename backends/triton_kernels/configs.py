"""Block sizes and launch settings of the shared Triton kernels, per chip arch (NVIDIA's here, AMD's in
amd_configs.py; a Platform hands its backend the table of its arch).

A backend picks its table with `kernel_configs(arch)` and passes it to the
kernels; nothing in the kernels' code depends on the vendor. `launch` holds
the keyword arguments of a Triton launch: num_warps and num_stages everywhere,
and on AMD also waves_per_eu and matrix_instr_nonkdim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class TileConfig:
    """One kernel's tile shape and launch settings.

    Attributes:
        block_m, block_n: output tile; block_k is always 128 (the scale block).
        group_m: row tiles grouped together in the launch order (L2 reuse of weight tiles).
        launch: Triton launch keywords (num_warps, num_stages, and vendor-specific ones).
    """

    block_m: int
    block_n: int
    group_m: int = 8
    launch: dict = field(default_factory=dict)

    def with_launch(self, **changes) -> "TileConfig":
        return replace(self, launch={**self.launch, **changes})


#: the most rows that take KernelConfigs.gemm_decode_batch (the sweeps went up to 16)
BATCH_TILE_MAX_M = 16


@dataclass(frozen=True)
class KernelConfigs:
    """Every kernel's settings for one arch.

    Attributes:
        gemm_prefill: the tiled FP8 GEMM for M above `decode_max_m`.
        gemm_decode: the split-K FP8 GEMM for M <= decode_max_m (block_m is the smallest M tile).
        gemm_decode_batch: the same for 2 <= M <= BATCH_TILE_MAX_M, where it was swept (None: gemm_decode).
        decode_max_m: largest M that takes the decode kernel.
        scaled_mm_min_m: smallest M that takes torch._scaled_mm block-wise where the backend has it
            (on an H100 the decode kernel ties or wins up to M = 16, cuBLAS wins at M = 64 for
            N a multiple of 128).
        moe_decode, moe_prefill: grouped MoE GEMMs, chosen by tokens x top_k per expert on average;
            block_n is the down GEMM's (the gate/up GEMM always takes 128 columns: its SwiGLU epilogue
            quantizes whole 128-wide blocks).
        moe_prefill_min_rows: average rows per expert from which moe_prefill is used.
        moe_dense_max_stages: pipeline depth cap of the BF16/FP32 MoE (its tiles are 2-4x larger).
        quant: rows per program and launch settings of activation quantization.
        norm: RMSNorm: block_n columns per program, the row split over programs up to block_m rows
            (where the backend also quantizes in it).
        quant_prefill: the same above decode_max_m rows (None: `quant`); see `quant_tile`.
        decode_waves: programs per multiprocessor the split-K decode GEMM aims at (sets its split).
    """

    gemm_prefill: TileConfig
    gemm_decode: TileConfig
    decode_max_m: int
    scaled_mm_min_m: int
    moe_decode: TileConfig
    moe_prefill: TileConfig
    moe_prefill_min_rows: int
    moe_dense_max_stages: int
    quant: TileConfig
    norm: TileConfig
    quant_prefill: TileConfig | None = None
    decode_waves: float = 2.0
    gemm_decode_batch: TileConfig | None = None

    def decode_gemm_tile(self, rows: int) -> TileConfig:
        """The split-K decode GEMM's tile for `rows` rows (rows <= decode_max_m)."""
        if self.gemm_decode_batch is not None and 2 <= rows <= BATCH_TILE_MAX_M:
            return self.gemm_decode_batch
        return self.gemm_decode

    def quant_tile(self, rows: int) -> TileConfig:
        """The activation quantization's tile for `rows` rows."""
        return self.quant if rows <= self.decode_max_m or self.quant_prefill is None else self.quant_prefill


# NVIDIA Hopper (sm_90) and newer; also the default for NVIDIA chips with FP8 (sm_89). Each tile is the
# fastest of a sweep on an H100 (docs/performance.md has the numbers; `dsv3 bench` re-times each op).
NVIDIA_SM90 = KernelConfigs(
    gemm_prefill=TileConfig(128, 128, 8, {"num_warps": 8, "num_stages": 4}),
    # M = 1 reads each weight once: 64-column tiles with 8 warps, 3 stages and 4 programs per SM keep
    # enough loads in flight on all seven V3 decode weights
    gemm_decode=TileConfig(16, 64, 1, {"num_warps": 8, "num_stages": 3}),
    decode_max_m=64,
    scaled_mm_min_m=17,
    moe_decode=TileConfig(16, 128, 1, {"num_warps": 4, "num_stages": 3}),
    # prefill: 256-column down tiles with 4 stages halve the passes over each expert's activations;
    # 128-row tiles leave too few programs per expert
    moe_prefill=TileConfig(64, 256, 8, {"num_warps": 8, "num_stages": 4}),
    moe_prefill_min_rows=32,
    moe_dense_max_stages=2,
    quant=TileConfig(4, 128, 1, {"num_warps": 4}),
    # up to 16 rows the row is split over 1024-column programs, so the quantization's division and
    # rounding spread over more SMs; from 64 rows there are enough rows, and every part re-reading the
    # whole row for its sum costs more than it gains
    norm=TileConfig(16, 1024, 1, {"num_warps": 8}),
    # prefill-sized M: 16 rows a program amortise the launch over more bytes; at decode 4 rows a program
    # keep more programs
    quant_prefill=TileConfig(16, 128, 1, {"num_warps": 4}),
    decode_waves=4.0,
    # 2-16 rows: 4 warps per tile; the M = 1 tile's 8 warps idle on the extra rows' loads
    gemm_decode_batch=TileConfig(16, 64, 1, {"num_warps": 4, "num_stages": 3}),
)

# Ampere (sm_80/sm_86): no FP8; only the BF16 MoE and the norms run there.
NVIDIA_SM80 = replace(NVIDIA_SM90, gemm_prefill=TileConfig(128, 128, 8, {"num_warps": 8, "num_stages": 3}),
                      moe_prefill=TileConfig(64, 128, 8, {"num_warps": 4, "num_stages": 3}))

# A small, safe table for the CPU interpreter (TRITON_INTERPRET=1) and unknown chips.
PORTABLE = KernelConfigs(
    gemm_prefill=TileConfig(32, 32, 2, {"num_warps": 4, "num_stages": 2}),
    gemm_decode=TileConfig(16, 32, 1, {"num_warps": 4, "num_stages": 2}),
    decode_max_m=16,
    scaled_mm_min_m=17,
    moe_decode=TileConfig(16, 128, 1, {"num_warps": 4, "num_stages": 2}),
    moe_prefill=TileConfig(32, 128, 2, {"num_warps": 4, "num_stages": 2}),
    moe_prefill_min_rows=8,
    moe_dense_max_stages=2,
    quant=TileConfig(2, 128, 1, {"num_warps": 4}),
    norm=TileConfig(4, 256, 1, {"num_warps": 4}),
)


# ---- MLA decode (backends/triton_kernels/mla.py): NVIDIA's tiles here, AMD's in amd_configs.MLA_DECODE ----

@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes and split policy of the split-K decode kernel.

    Attributes:
        block_h: query heads per program.
        block_n: cached tokens per KV tile.
        num_warps, num_stages: Triton launch settings of the first kernel.
        programs_per_sm: programs to aim for per SM when splitting the sequence (about the number of
            programs one SM holds at once: one wave, no tail).
        min_split_tokens: fewest tokens per split (each split writes a partial output of
            heads x kv_lora_rank floats, which must stay small beside the cache bytes it reads).
        launch: more Triton launch keywords of the first kernel (AMD: waves_per_eu, matrix_instr_nonkdim).
    """

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int = 2
    min_split_tokens: int = 256
    launch: dict = field(default_factory=dict)


def default_decode_config(num_heads: int, dtype: torch.dtype) -> DecodeConfig:
    """Tile sizes for `num_heads` query heads (swept on an H200 by `dsv3 bench mla`).

    16 heads: 8 warps (4 warps spill at 255 registers and issue too slowly with one program an SM) and
    splits as short as one tile, so that a batch of one sequence still spreads over the SMs.
    """
    if dtype == torch.float32:
        return DecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
    if num_heads <= 16:
        return DecodeConfig(block_h=16, block_n=64, num_warps=8, num_stages=3, programs_per_sm=2, min_split_tokens=64)
    return DecodeConfig(block_h=64, block_n=64, num_warps=8, num_stages=2, programs_per_sm=2, min_split_tokens=128)


CONFIGS: dict[str, KernelConfigs] = {
    "sm_90": NVIDIA_SM90,
    "sm_89": NVIDIA_SM90,
    "sm_100": NVIDIA_SM90,
    "sm_120": NVIDIA_SM90,
    "sm_80": NVIDIA_SM80,
    "sm_86": NVIDIA_SM80,
    "portable": PORTABLE,
}


def kernel_configs(arch: str) -> KernelConfigs:
    """The table for `arch` ("sm_90", "gfx942", ...), or the portable one for an arch not listed."""
    return CONFIGS.get(arch, PORTABLE)
