"""The one interface between the DeepSeek-V3 model and the hardware.

The model in `dsv3/` calls these methods for every heavy op and never looks at
the device. A backend prepares weights once at load (keeping FP8 with scales,
dequantizing to BF16, converting to e4m3fnuz, reordering for its kernels) and
owns the layout of the MLA latent cache (the layouts are in latent_cache.py).

Shapes use: N tokens, B sequences, T tokens per sequence, H heads, D hidden,
E routed experts, I expert intermediate size, k experts per token.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.latent_cache import CacheSpec
from dsv3.backends.platforms import CPU, Platform, cpu_name

Precision = Literal["fp8", "bf16", "fp32"]
#: the dtype of each dense precision
DENSE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

#: The ops every backend reports an implementation for, in `Capabilities.ops`.
OPS: tuple[str, ...] = (
    "linear_fp8", "linear_bf16", "rms_norm", "rotary", "swiglu",
    "mla_prefill", "mla_decode", "moe_route", "moe_experts",
)


@dataclass(frozen=True)
class OpImpl:
    """How a backend runs one op, as data: written where the backend's dispatch takes its limits from, so
    `Capabilities.ops` says what the dispatch does.

    Attributes:
        name: what runs.
        when: where it runs, from the limits the dispatch checks ("" = always).
        otherwise: what runs elsewhere (with `when`).
        notes: facts a vendor adds (libraries found or not used).
    """

    name: str
    when: str = ""
    otherwise: str = ""
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.name} where {self.when}; else {self.otherwise}" if self.when else self.name
        return "; ".join((text, *self.notes))


@dataclass(frozen=True)
class Capabilities:
    """Static facts about a backend, fixed when it is built.

    Attributes:
        name: backend name ("reference", "cuda", "rocm", "ascend").
        device: torch device string the backend computes on.
        fp8_dtype: the FP8 dtype its kernels take, or None where the chip has no FP8.
        fp8_max: the value activation amax maps to when quantizing (448, or 224 on gfx942).
        dist_backend: torch.distributed backend for this hardware (nccl, hccl, gloo).
        native_fp8: the chip runs FP8 natively (the reference backend only emulates it), so
            precision "auto" picks FP8 for FP8 checkpoints.
        ops: op name -> a short description of the implementation that runs (an OpImpl given here is
            kept as its description).
    """

    name: str
    device: str
    fp8_dtype: torch.dtype | None
    fp8_max: float | None
    dist_backend: str
    native_fp8: bool = False
    ops: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "ops", MappingProxyType({op: str(impl) for op, impl in self.ops.items()}))

    @property
    def has_fp8(self) -> bool:
        return self.fp8_dtype is not None


@dataclass
class LinearWeight:
    """A linear layer's weight as a backend keeps it.

    Attributes:
        weight: [out, in], FP8 (with `scale`) or the compute dtype.
        scale: float32 [ceil(out/128), ceil(in/128)] block scales for FP8, else None.
        out_features, in_features: logical sizes.
        extra: backend-private data (a transposed copy, a kernel config, ...).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    out_features: int
    in_features: int
    extra: dict = field(default_factory=dict)

    @property
    def is_fp8(self) -> bool:
        return self.scale is not None


@dataclass
class ExpertWeights:
    """The routed experts of one MoE layer, stacked.

    Attributes:
        gate_up: [E, 2I, D]: gate rows first, then up rows (FP8 or compute dtype).
        gate_up_scale: float32 [E, ceil(2I/128), ceil(D/128)] or None.
        down: [E, D, I].
        down_scale: float32 [E, ceil(D/128), ceil(I/128)] or None.
        extra: backend-private data.
    """

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor | None
    down: torch.Tensor
    down_scale: torch.Tensor | None
    extra: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[-1]

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_scale is not None


@dataclass
class MLAWeights:
    """The absorbed MLA projections split from kv_b_proj.

    Attributes:
        w_uk: [H, qk_nope_head_dim, kv_lora_rank]: q_nope @ w_uk gives the latent query.
        w_uv: [H, v_head_dim, kv_lora_rank]: latent output @ w_uv^T gives per-head values.
        extra: backend-private data.
    """

    w_uk: torch.Tensor
    w_uv: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizedActivation:
    """An activation together with its FP8 copy, made by the op that produced it (RMSNorm).

    The copy is what an FP8 linear would make itself (per token per 128 channels, the backend's FP8
    format), so a linear or the routed experts that receive this skip their own quantization; the
    result is the same bit for bit. Anything else reads `values`.

    Attributes:
        values: [..., K] in the activation dtype.
        q: [M, K] FP8, M = values.numel() / K.
        scales: float32 [M, ceil(K/128)], column-major.
    """

    values: torch.Tensor
    q: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


def plain(x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
    """The activation values, whether or not an FP8 copy came with them."""
    return x.values if isinstance(x, QuantizedActivation) else x


@dataclass(frozen=True)
class NormOutput:
    """What `Backend.rms_norm` returns, on every backend and with or without a residual.

    Attributes:
        values: [..., D] the normalized activation, in x's dtype.
        residual: [..., D] the residual stream the next residual add reads: x + residual where a residual
            came, else x itself.
        quantized: the FP8 copy of `values` (per token per 128 channels) where `quantize` asked for it and
            the backend made it, else None.
    """

    values: torch.Tensor
    residual: torch.Tensor
    quantized: QuantizedActivation | None = None

    @property
    def activation(self) -> torch.Tensor | QuantizedActivation:
        """What a linear or the routed experts read: the FP8 copy where one came (they skip their own
        quantization, bit for bit the same result), else the values."""
        return self.values if self.quantized is None else self.quantized


@dataclass(frozen=True)
class RoutingConfig:
    """How a MoE layer picks experts (from the model config).

    Attributes:
        scoring: "sigmoid" (V3) or "softmax" (V2).
        method: "noaux_tc" (V3), "group_limited_greedy" (V2) or "greedy" (V2-Lite).
        top_k: experts per token.
        num_groups, topk_groups: expert groups and how many a token may use.
        normalize: divide the chosen weights by their sum.
        scaling: routed_scaling_factor, applied to the final weights.
    """

    scoring: str
    method: str
    top_k: int
    num_groups: int
    topk_groups: int
    normalize: bool
    scaling: float


@dataclass(frozen=True)
class MemoryInfo:
    """A device's memory in bytes, as Backend.memory_info reports it.

    Attributes:
        total: the device's memory.
        free: free now, device-wide (other processes and non-torch allocations excluded).
        allocated: held by this process's tensors now.
        peak: the most `allocated` has been since the last reset.
        accelerator: an accelerator's own memory (False: the host's, where the cache is sized by tokens).
    """

    total: int
    free: int
    allocated: int
    peak: int
    accelerator: bool


@dataclass(frozen=True)
class MLAInputs:
    """The new tokens' attention inputs, flat over the batch (N tokens, H heads, C kv_lora_rank, R rope dim).

    Attributes:
        q_nope: [N, H, qk_nope_head_dim].
        q_pe: [N, H, R]; rotated, except in mla_decode with `rope` given.
        latent: [N, C] normalized.
        k_pe: [N, R]; rotated, except in mla_decode with `rope` given.
    """

    q_nope: torch.Tensor
    q_pe: torch.Tensor
    latent: torch.Tensor
    k_pe: torch.Tensor


@dataclass(frozen=True)
class PagedBatch:
    """Where each sequence's tokens live in the paged cache (B sequences).

    Attributes:
        block_tables: int32 [B, max_blocks_per_seq]: the physical block of each logical block of a
            sequence (token p of sequence b is row p % block_size of block block_tables[b, p // block_size]);
            padding entries 0.
        seq_lens: int32 [B]: tokens in the cache for each sequence once this call's tokens are written.
        query_start: int32 [B + 1]: sequence b's new tokens are rows query_start[b]:query_start[b + 1] of the
            MLAInputs, at positions seq_lens[b] - q_len_b .. seq_lens[b] - 1 (decode: arange(B + 1)).
        max_query_len, max_seq_len: host ints, upper bounds of the query lengths and seq_lens for kernel
            grids (prefill); decode never needs them.
        shared_rows: host bool, decode only: rows may be successive tokens of one sequence (a short prompt
            chunk run as decode rows, each with its own seq_len and a copy of the sequence's table), so
            row b attends to the tokens of the rows before it: every row's token is in the cache before
            any row reads it. A backend that writes all rows before attending needs nothing more.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start: torch.Tensor
    max_query_len: int
    max_seq_len: int
    shared_rows: bool = False

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    def token_positions(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence int64 [N], position int64 [N]) of each new token, computed on the device (no sync)."""
        token = torch.arange(num_tokens, device=self.query_start.device)
        query_end = self.query_start[1:].long()
        seq = torch.searchsorted(query_end, token, right=True)
        return seq, self.seq_lens.long()[seq] - query_end[seq] + token

    def cache_rows(self, seq: torch.Tensor, position: torch.Tensor, block_size: int) -> torch.Tensor:
        """int64 row of each (sequence, position) in the pool seen as [num_blocks * block_size, ...]."""
        block = self.block_tables.long()[seq, position // block_size]
        return block * block_size + position % block_size


class Backend(ABC):
    """Base class of every backend. Subclasses set `capabilities` in __init__.

    The abstract methods are the ops every backend implements. Every other op has a default here (the
    reference math, or None where a backend cannot do something, as graph_runner), which a backend
    overrides where it has its own; callers never probe for an op with hasattr.

    `emulation` stays None for a backend that runs on its own device; a backend whose vendor ops are
    stood in for (a CPU emulation of torch_npu, TRITON_INTERPRET=1) says what is emulated, and
    `dsv3 conformance` then reports its passing cases as "emulated", never as "pass".
    """

    capabilities: Capabilities
    emulation: str | None = None
    #: the vendor facts this backend runs with (backends/platforms); the reference backend's are the CPU's
    platform: Platform = CPU
    #: activation scales rounded up to powers of two (DeepSeek-V3.1's scale_fmt "ue8m0"); the model sets it
    #: from the checkpoint's config before it runs
    ue8m0: bool = False

    @property
    def device(self) -> torch.device:
        return torch.device(self.capabilities.device)

    @property
    def mla_block_size(self) -> int:
        """The block size of the paged latent cache this backend's attention runs fastest with, from its
        platform (the engine's default where the user names none); every backend takes any block size."""
        return self.platform.mla_block_size

    def supports(self, op: str, precision: str) -> bool:
        """Whether this backend runs `op` at `precision` (cautious default: FP8 only with an FP8 dtype)."""
        if precision == "fp8":
            return self.capabilities.has_fp8 and op in self.capabilities.ops
        return op in self.capabilities.ops

    # ---- weight preparation (once, at load) --------------------------------

    @abstractmethod
    def prepare_linear(self, weight: torch.Tensor, scale_inv: torch.Tensor | None,
                       precision: Precision) -> LinearWeight:
        """Keep a linear's weight for `linear`.

        Args:
            weight: [out, in] FP8 e4m3fn (with scale_inv) or floating point.
            scale_inv: float32 block scales for an FP8 weight, else None.
            precision: "fp8" keeps or makes FP8 blocks; "bf16"/"fp32" keep a dense weight.
        """

    @abstractmethod
    def prepare_experts(self, gate_up: torch.Tensor, gate_up_scale: torch.Tensor | None,
                        down: torch.Tensor, down_scale: torch.Tensor | None, precision: Precision) -> ExpertWeights:
        """Keep stacked routed-expert weights (shapes as in ExpertWeights)."""

    @abstractmethod
    def prepare_mla(self, kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int,
                    v_head_dim: int, dtype: torch.dtype) -> MLAWeights:
        """Split a dense kv_b_proj weight [H*(nope+v), kv_lora_rank] into w_uk and w_uv."""

    def dense_weight(self, weight: torch.Tensor, scale_inv: torch.Tensor | None, precision: Precision) -> torch.Tensor:
        """`weight` as a dense precision ("bf16", "fp32") keeps it, on the device it is on: FP8 blocks times
        their scales (stacked experts one matrix at a time), any other weight cast."""
        dtype = DENSE_DTYPES[precision]
        return weight.to(dtype) if scale_inv is None else fp8.dequantize_blocks(weight, scale_inv, dtype)

    # ---- GEMM --------------------------------------------------------------

    @abstractmethod
    def linear(self, x: torch.Tensor | QuantizedActivation, weight: LinearWeight) -> torch.Tensor:
        """y = x @ W^T. x [..., in] -> [..., out] in x's dtype; FP8 weights quantize x per 1x128 block
        (or take the FP8 copy a QuantizedActivation brings)."""

    def quantize_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (FP8 [M, K], float32 scales [M, ceil(K/128)]), per token per 128 channels, in this
        backend's FP8 format and max. Default: the reference math (backends/fp8.py)."""
        caps = self.capabilities
        return fp8.quantize_activation(x, caps.fp8_dtype, caps.fp8_max, self.ue8m0)

    def fp8_gemm(self, qa: torch.Tensor, sa: torch.Tensor, weight: LinearWeight,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The GEMM of an FP8 linear on activations quantized by `quantize_activation`: qa [M, K],
        sa [M, K/128] -> [M, N] in out_dtype. Default: the exact block math in fp32."""
        return fp8.block_scaled_matmul(qa, sa, weight.weight, weight.scale).to(out_dtype)

    def linear_impl(self, m: int, weight: LinearWeight) -> str:
        """Which GEMM a linear with M rows runs (for reports). Default: Capabilities.ops' line."""
        return self.capabilities.ops.get("linear_fp8" if weight.is_fp8 else "linear_bf16", "linear")

    # ---- small ops ---------------------------------------------------------

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 quantize: bool = False) -> NormOutput:
        """RMSNorm over the last dim, in fp32, result in x's dtype.

        With `residual`, first h = x + residual and normalize h; NormOutput.residual is h (x without one).
        `quantize` says the result feeds FP8 linears: a backend that can also returns the FP8 copy
        (NormOutput.quantized); one that cannot leaves it None.
        """

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up in gate's dtype, silu rounded to it before the product (the MLPs' activation).

        This torch version serves every backend that does not fuse it.
        """
        return F.silu(gate) * up

    @abstractmethod
    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Interleaved rotary embedding: pairs (x[2i], x[2i+1]) rotate by angle i.

        Args:
            x: [B, T, ..., R] with R the rope dim.
            cos, sin: [B, T, R/2] float32 per position.
        """

    # ---- MLA ---------------------------------------------------------------

    @abstractmethod
    def mla_cache_spec(self, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                       dtype: torch.dtype, kv_cache_dtype: str = "auto") -> CacheSpec:
        """The layout of one layer's paged latent cache: `num_blocks` blocks of `block_size` tokens, each
        token kv_lora_rank latent then rope_dim rope-key values. Raises BackendError for a pool the
        backend cannot lay out.

        dtype is the activation dtype; kv_cache_dtype (--kv-cache-dtype) "auto" keeps the cache in it,
        "bf16" in BF16, "fp8" asks for the FP8 latent cache (fp8_latent_cache_spec). A backend that has no
        FP8 cache returns a dense spec for "fp8" (kind "dense", its layout saying why): the model's
        loader says so.
        """

    @abstractmethod
    def allocate_mla_cache(self, spec: CacheSpec) -> torch.Tensor:
        """Allocate one layer's latent cache as described by `spec` (zeroed)."""

    @abstractmethod
    def mla_prefill(self, inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch, weights: MLAWeights,
                    softmax_scale: float) -> torch.Tensor:
        """Write each sequence's new tokens through its block table and attend causally.

        Sequence b's new tokens sit at positions seq_lens[b] - q_len_b .. seq_lens[b] - 1 (a chunk may
        start mid-sequence: the earlier positions are read from the cache); token p attends over [0, p].
        A backend may pad every sequence to batch.max_query_len queries and batch.max_seq_len keys, so a
        step's one-token decodes belong in mla_decode.

        Args:
            inputs: N new tokens, q_pe and k_pe rotated.
            cache: this layer's pool (mla_cache_spec); batch: block tables, lengths and query offsets.
            weights: the absorbed projections; softmax_scale: applied to the q.k scores.
        Returns:
            [N, H, v_head_dim] in q_nope's dtype.
        """

    @abstractmethod
    def mla_decode(self, inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch, weights: MLAWeights,
                   softmax_scale: float, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One new token per sequence at position seq_lens[b] - 1: write it, attend over [0, seq_lens[b]).

        Reads lengths and tables on the device only: no host sync, so a GPU backend can record it in a graph.

        Args:
            inputs: B new tokens (N = B).
            cache, batch: as in mla_prefill (batch.query_start is arange(B + 1)).
            rope: None when q_pe and k_pe come rotated; else (cos, sin) [B, R/2] float32 of the new
                positions, and the backend rotates them as `rotary` does (a fused backend inside the
                attention kernel, which also writes the rotated key to the cache; see `rotate_for_decode`).
        Returns:
            [B, H, v_head_dim] in q_nope's dtype.
        """

    def rotate_for_decode(self, q_pe: torch.Tensor, k_pe: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q_pe [B, H, R] and k_pe [B, R] rotated by rope = (cos, sin) [B, R/2] with `rotary` (unchanged
        for None): what mla_decode does first in a backend that does not fuse the rotation."""
        if rope is None:
            return q_pe, k_pe
        cos, sin = (t.reshape(t.shape[0], 1, -1) for t in rope)
        return self.rotary(q_pe[:, None], cos, sin)[:, 0], self.rotary(k_pe[:, None], cos, sin)[:, 0]

    # ---- MoE ---------------------------------------------------------------

    @abstractmethod
    def moe_route(self, x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None,
                  config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick experts per token.

        Args:
            x: [N, D]; gate_weight: [E, D]; bias: [E] float32 correction bias (selection only) or None.
        Returns:
            (weights float32 [N, k], ids int64 [N, k]).
        """

    @abstractmethod
    def moe_experts(self, x: torch.Tensor | QuantizedActivation, weights: torch.Tensor, ids: torch.Tensor,
                    experts: ExpertWeights) -> torch.Tensor:
        """sum_j weights[n, j] * down(silu(gate(x_n)) * up(x_n)) over the chosen experts ids[n, j].

        A pair with expert id -1 is skipped: it contributes nothing (its weight is ignored) and costs no
        rows of the grouped GEMM. Expert parallelism marks the pairs of other ranks' experts so; a row whose
        pairs are all -1 comes out zero. The caller marks pairs without changing shapes or waiting.

        Args:
            x: [N, D], or a QuantizedActivation of it; weights: [N, k] float32; ids: [N, k] int64, an expert
                in [0, E) or -1.
        Returns:
            [N, D] in x's dtype.
        """

    # ---- graphs ------------------------------------------------------------

    def graph_runner(self, step: Callable[[], None]) -> Callable[[], None] | None:
        """Record `step` for cheap replay; None where this backend cannot (the default).

        `step` reads and writes only tensors allocated before the call (static inputs and
        outputs) and never waits for the device. The backend may run it while recording (a
        warm-up), so running it twice in a row must be harmless. The returned callable reruns
        the recorded work on the same tensors.
        """
        return None

    # ---- device helpers ----------------------------------------------------

    def device_name(self) -> str:
        """What the driver calls this backend's device (the CPU's model name on the CPU)."""
        device = self.device
        if device.type == "cpu":
            return cpu_name()
        try:
            return str(torch.get_device_module(device.type).get_device_name(device.index or 0))
        except Exception as e:  # noqa: BLE001 - a device module without names: say so rather than fail a report
            return f"{device.type} ({type(e).__name__})"

    def synchronize(self) -> None:
        """Wait for queued work on the backend's device."""
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def memory_info(self, reset_peak: bool = False) -> MemoryInfo:
        """The device's memory, for sizing the latent cache (see MemoryInfo).

        The default: on the CPU, the host's memory (accelerator False; the engine then sizes the cache
        by --cache-tokens); elsewhere torch.accelerator's view of the device. reset_peak starts a new
        peak measurement after reading this one.
        """
        if self.device.type == "cpu":
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            try:
                free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            except (ValueError, OSError):
                free = total
            return MemoryInfo(total=total, free=free, allocated=0, peak=0, accelerator=False)
        free, total = torch.accelerator.get_memory_info(self.device)
        info = MemoryInfo(total=total, free=free, allocated=torch.accelerator.memory_allocated(self.device),
                          peak=torch.accelerator.max_memory_allocated(self.device), accelerator=True)
        if reset_peak:
            torch.accelerator.reset_peak_memory_stats(self.device)
        return info
