"""The one interface between the DeepSeek-V3 model and the hardware.

The model in `dsv3/` calls these methods for every heavy op and never looks at
the device. A backend prepares weights once at load (keeping FP8 with scales,
dequantizing to BF16, converting to e4m3fnuz, reordering for its kernels) and
owns the layout of the MLA latent cache.

Shapes use: N tokens, B sequences, T tokens per sequence, H heads, D hidden,
E routed experts, I expert intermediate size, k experts per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F

Precision = Literal["fp8", "bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("fp8", "bf16", "fp32")

#: The ops every backend reports an implementation for, in `Capabilities.ops`.
OPS: tuple[str, ...] = (
    "linear_fp8", "linear_bf16", "rms_norm", "rotary", "swiglu",
    "mla_prefill", "mla_decode", "moe_route", "moe_experts",
)


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
        ops: op name -> a short description of the implementation that runs.
    """

    name: str
    device: str
    fp8_dtype: torch.dtype | None
    fp8_max: float | None
    dist_backend: str
    native_fp8: bool = False
    ops: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "ops", MappingProxyType(dict(self.ops)))

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
class CacheSpec:
    """The latent cache of one layer as a backend lays it out."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    bytes_per_token: int


class Backend(ABC):
    """Base class of every backend. Subclasses set `capabilities` in __init__.

    `emulation` stays None for a backend that runs on its own device; a backend whose vendor ops are
    stood in for (a CPU emulation of torch_npu, TRITON_INTERPRET=1) says what is emulated, and
    `dsv3 conformance` then reports its passing cases as "emulated", never as "pass".
    """

    capabilities: Capabilities
    emulation: str | None = None

    @property
    def device(self) -> torch.device:
        return torch.device(self.capabilities.device)

    def supports(self, op: str, precision: str) -> bool:
        """Whether this backend runs `op` at `precision` (cautious default: FP8 only with an FP8 dtype)."""
        if precision == "fp8":
            return self.capabilities.has_fp8 and op in self.capabilities.ops
        return op in self.capabilities.ops

    # ---- weight preparation (once, at load) --------------------------------

    @abstractmethod
    def prepare_linear(self, weight: torch.Tensor, scale_inv: torch.Tensor | None, precision: Precision) -> LinearWeight:
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

    # ---- GEMM --------------------------------------------------------------

    @abstractmethod
    def linear(self, x: torch.Tensor | QuantizedActivation, weight: LinearWeight) -> torch.Tensor:
        """y = x @ W^T. x [..., in] -> [..., out] in x's dtype; FP8 weights quantize x per 1x128 block
        (or take the FP8 copy a QuantizedActivation brings)."""

    # ---- small ops ---------------------------------------------------------

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 quantize: bool = False):
        """RMSNorm over the last dim, in fp32, result in x's dtype.

        With `residual`, first h = x + residual and return (rms_norm(h), h).
        `quantize` says the result feeds FP8 linears: a backend that quantizes in the same kernel returns a
        QuantizedActivation in place of the normalized tensor; one that does not ignores the flag.
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
    def mla_cache_spec(self, max_batch_size: int, max_seq_len: int, kv_lora_rank: int,
                       rope_dim: int, dtype: torch.dtype) -> CacheSpec:
        """The layout of one layer's latent cache."""

    @abstractmethod
    def allocate_mla_cache(self, spec: CacheSpec) -> torch.Tensor:
        """Allocate one layer's latent cache as described by `spec`."""

    @abstractmethod
    def mla_prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                    cache: torch.Tensor, slots: torch.Tensor, start_pos: int, weights: MLAWeights,
                    softmax_scale: float) -> torch.Tensor:
        """Write T new tokens per sequence to the cache and attend causally over positions [0, start_pos + T).

        Args:
            q_nope: [B, T, H, qk_nope_head_dim]; q_pe: [B, T, H, R] already rotated.
            latent: [B, T, kv_lora_rank] normalized; k_pe: [B, T, R] already rotated.
            cache: this layer's cache; slots: [B] cache rows of the sequences.
            start_pos: tokens already cached for every sequence (a shared prefix length).
        Returns:
            [B, T, H, v_head_dim].
        """

    @abstractmethod
    def mla_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                   cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, weights: MLAWeights,
                   softmax_scale: float, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One new token per sequence at its own position; attend over [0, position].

        Args:
            q_nope: [B, H, nope]; q_pe: [B, H, R]; latent: [B, kv_lora_rank]; k_pe: [B, R].
            slots: [B] cache rows; positions: [B] int64 position of the new token.
            rope: None when q_pe and k_pe come rotated; else (cos, sin) [B, R/2] float32 of the new
                positions, and the backend rotates them as `rotary` does (a fused backend inside the
                attention kernel, which also writes the rotated key to the cache; see `rotate_for_decode`).
        Returns:
            [B, H, v_head_dim].
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

        Args:
            x: [N, D], or a QuantizedActivation of it; weights: [N, k] float32; ids: [N, k] int64.
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

    def synchronize(self) -> None:
        """Wait for queued work on the backend's device."""
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)
