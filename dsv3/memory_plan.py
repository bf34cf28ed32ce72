"""What a layout needs on each rank, before anything is loaded: `dsv3 doctor --plan`.

Weights per rank come from the checkpoint's layout and the cut (checks.model_bytes with a
ParallelPlan); the latent cache gets what is left of each device under --gpu-memory-utilization
after the weights and a reserve for the runtime (context, communication buffers, activations),
as the engine sizes it after loading. A layout that cannot be cut (heads, experts, vocabulary or
FP8 blocks not dividing) is refused by ParallelPlan.check, naming the numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dsv3 import checks
from dsv3.backends.latent_cache import fp8_row_bytes
from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error, UsageError
from dsv3.parallel import ParallelPlan

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class DeviceKind:
    """An accelerator as its vendor tool reports it.

    Attributes:
        name: what --devices calls it.
        memory_bytes: memory per device (nvidia-smi, rocm-smi, npu-smi).
        fp8: the FP8 format it computes in, or None (no FP8: an FP8 checkpoint runs in BF16).
        count: devices in the usual deployment (the count when --devices gives none).
    """

    name: str
    memory_bytes: int
    fp8: str | None
    count: int


DEVICE_KINDS = {kind.name.lower(): kind for kind in (
    DeviceKind("H200", 143_771 * MiB, "e4m3fn", 8),
    DeviceKind("H100", 81_559 * MiB, "e4m3fn", 8),
    DeviceKind("MI300X", 205_822_885_888, "e4m3fnuz", 8),
    DeviceKind("910B", 64 * GiB, None, 32),
)}


def parse_devices(text: str) -> tuple[DeviceKind, int]:
    """"H200x8", "MI300Xx8" or "910B" (the kind's usual count) -> (kind, count)."""
    match = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", text.replace(" ", "").lower())
    kind = DEVICE_KINDS.get(match.group(1)) if match else None
    if kind is None or (match.group(2) is not None and int(match.group(2)) < 1):
        known = ", ".join(f"{k.name}x{k.count}" for k in DEVICE_KINDS.values())
        raise UsageError(f"--devices {text}: expected a device kind and count such as H200x8 (known: {known})")
    return kind, kind.count if match.group(2) is None else int(match.group(2))


@dataclass(frozen=True)
class MemoryPlan:
    """One layout on one kind of device, per rank.

    Attributes:
        plan: rank 0's ParallelPlan (every rank holds as much).
        kind, num_devices: the devices.
        precision: the weights' compute precision ("fp8" or "bf16").
        weight_bytes: weights per rank.
        usable_bytes: memory per device x gpu_memory_utilization.
        reserve_bytes: kept for the runtime (context, communication buffers, activations).
        cache_bytes_per_token: latent cache per token on a rank (every layer).
        max_model_len: the longest request; the layout fits when a rank's cache holds one.
    """

    plan: ParallelPlan
    kind: DeviceKind
    num_devices: int
    precision: str
    weight_bytes: int
    usable_bytes: int
    reserve_bytes: int
    cache_bytes_per_token: int
    max_model_len: int

    @property
    def cache_bytes(self) -> int:
        """Cache per rank: what is left after the weights and the reserve (0 when nothing is)."""
        return max(self.usable_bytes - self.weight_bytes - self.reserve_bytes, 0)

    @property
    def cache_tokens(self) -> int:
        """Tokens of latent cache per rank."""
        return self.cache_bytes // self.cache_bytes_per_token

    @property
    def total_tokens(self) -> int:
        """Tokens the deployment holds: a TP group shares one cache; each DP group has its own."""
        return self.cache_tokens * self.plan.dp

    @property
    def fits(self) -> bool:
        return self.cache_tokens >= self.max_model_len

    def to_dict(self) -> dict:
        p = self.plan
        return {"devices": f"{self.kind.name}x{self.num_devices}", "ranks": p.world_size, "tp": p.tp, "dp": p.dp,
                "ep": p.ep, "precision": self.precision, "weight_bytes": self.weight_bytes,
                "usable_bytes": self.usable_bytes, "reserve_bytes": self.reserve_bytes,
                "cache_bytes": self.cache_bytes, "cache_bytes_per_token": self.cache_bytes_per_token,
                "cache_tokens_per_rank": self.cache_tokens, "cache_tokens_total": self.total_tokens,
                "max_model_len": self.max_model_len, "fits": self.fits}


def memory_plan(config: ModelConfig, kind: DeviceKind, num_devices: int, tp: int = 1, dp: int = 1,
                expert_parallel: bool = False, precision: str = "auto", kv_cache_dtype: str = "auto",
                gpu_memory_utilization: float = 0.9, reserve_bytes: int = 5 * GiB,
                max_model_len: int | None = None) -> MemoryPlan:
    """The memory plan of a layout; Dsv3Error where the layout is impossible (before any arithmetic on memory).

    Args:
        config: the model's config.
        kind, num_devices: the devices (the layout's ranks must fit in them).
        tp, dp: --tensor-parallel-size and --data-parallel-size; tp x dp ranks.
        expert_parallel: --enable-expert-parallel: each rank holds whole experts (ep = ranks); without it
            every routed expert is split over all ranks.
        precision: "auto" (FP8 where the checkpoint and the device have it, else BF16), "fp8" or "bf16".
        kv_cache_dtype: "auto" (BF16 latents) or "fp8" (the FP8 latent cache: 656 bytes per layer on V3).
    """
    world = tp * dp
    if world > num_devices:
        raise Dsv3Error(f"--tensor-parallel-size {tp} x --data-parallel-size {dp} = {world} ranks, but "
                        f"{kind.name}x{num_devices} has {num_devices} devices")
    if precision == "auto":
        precision = "fp8" if config.is_fp8 and kind.fp8 else "bf16"
    elif precision == "fp8" and kind.fp8 is None:
        raise Dsv3Error(f"--precision fp8: {kind.name} has no FP8; an FP8 checkpoint runs there in bf16")
    plan = ParallelPlan(rank=0, world_size=world, local_rank=0, tp=tp, ep=world if expert_parallel else 1, dp=dp)
    plan.check(config, precision)
    weights, _ = checks.model_bytes(config, precision, 0, 0, plan)
    c = config
    if kv_cache_dtype == "fp8":  # the latent in FP8 with a float32 scale per 128 values, the rope key in BF16
        per_token = fp8_row_bytes(c.kv_lora_rank, c.qk_rope_head_dim, torch.bfloat16) * c.num_hidden_layers
    else:
        per_token = c.latent_cache_bytes_per_token(2)
    return MemoryPlan(plan, kind, num_devices, precision, weights, int(kind.memory_bytes * gpu_memory_utilization),
                      reserve_bytes, per_token, max_model_len or min(4096, c.max_position_embeddings))


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB"


def format_plan(m: MemoryPlan, model: str) -> str:
    """The plan as text lines: the layout, then per rank, then whether it fits."""
    p = m.plan
    cut = p.describe()
    lines = [
        f"model      {model}: {m.precision} weights",
        f"devices    {m.kind.name} x {m.num_devices}, {_gib(m.kind.memory_bytes)} each"
        + (f" ({p.world_size} used)" if p.world_size < m.num_devices else ""),
        f"layout     tp {p.tp}, dp {p.dp}, ep {p.ep}: {cut}",
        f"per rank   weights {_gib(m.weight_bytes)} + reserve {_gib(m.reserve_bytes)} of {_gib(m.usable_bytes)} "
        f"usable; latent cache {_gib(m.cache_bytes)} = {m.cache_tokens:,} tokens "
        f"({m.cache_bytes_per_token:,} bytes per token)",
        f"in total   {m.total_tokens:,} tokens of cache"
        + (f" ({p.dp} DP groups of {m.cache_tokens:,})" if p.dp > 1 else " (one copy shared by every rank)"),
    ]
    if m.fits:
        lines.append(f"fits       yes: a rank holds {m.cache_tokens // m.max_model_len:,} requests of "
                     f"max_model_len={m.max_model_len:,}")
    return "\n".join(lines)


def not_fitting(m: MemoryPlan) -> str:
    """The error line of a plan that does not fit."""
    need = m.weight_bytes + m.reserve_bytes + m.max_model_len * m.cache_bytes_per_token
    return (f"does not fit: each rank needs {_gib(m.weight_bytes)} of weights + {_gib(m.reserve_bytes)} reserve + "
            f"{_gib(m.max_model_len * m.cache_bytes_per_token)} for one request of max_model_len="
            f"{m.max_model_len:,} = {_gib(need)}, but each {m.kind.name} gives {_gib(m.usable_bytes)} at this "
            f"--gpu-memory-utilization; use more devices or a device with more memory"
            + ("" if m.precision == "fp8" or m.kind.fp8 is None else ", or --precision fp8"))
