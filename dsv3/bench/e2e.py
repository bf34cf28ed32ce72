"""`dsv3 bench decode|prefill`: whole model steps at DeepSeek-V3's layer dimensions, beside their floor.

The model is configs/deepseek-v3.yaml with fewer layers (dense first, then MoE, as in V3; at least
one MoE layer): `--layers N`, or as many as fit in the device's free memory with 15% to spare. Its
weights are synthetic FP8 made on the device (RandomSource(fast=True)). Decode runs at batch 1, 16,
64 and 128 with 1k and 8k tokens already in every sequence's cache (random latents are written
into the cache instead of running a long prefill), through the engine's DecodeRunner (graph replay
where the backend records one) and eagerly (Transformer.decode); prefill runs 4096 tokens of one
sequence up to the last token's logits.

The floor of a step is max(bytes / copy bandwidth, FP8 FLOPs / FP8 block-wise rate + other FLOPs /
BF16 rate), all measured in the same run (common.measure_roofline). Bytes: every weight the step
reads once (of the routed experts only those the batch hits, counted during the run), the cache
rows attention reads, the float32 logits written. FLOPs: 2 per multiply-add of the linears (FP8
class), and of absorbed attention over the cache, the router and the head (BF16 class; prefill
counts the non-absorbed attention over causal pairs and the kv_b expansion instead).

The reference backend on the same device is the naive peer (batch 1, eager: it synchronises the
host). One decode step at batch 64 is profiled (torch.profiler, top kernels by device time).
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from backends.interface import Backend
from dsv3.bench.common import Roofline, environment, format_roofline, measure_roofline
from dsv3.config import ModelConfig
from dsv3.engine import DecodeRunner
from dsv3.errors import Dsv3Error
from dsv3.model import ACTIVATION_DTYPES, ForwardState, Transformer
from dsv3.weights import RandomSource, WeightLoader

BLOCK = 128
DECODE_BATCHES: tuple[int, ...] = (1, 16, 64, 128)
CONTEXTS: tuple[int, ...] = (1024, 8192)
PREFILL_TOKENS = 4096
QUICK_BATCHES: tuple[int, ...] = (1, 64)
QUICK_CONTEXTS: tuple[int, ...] = (1024,)
PROFILE_BATCH = 64
HEADROOM = 0.15            # of free device memory left unused
WORKSPACE_BYTES = 1 << 30  # activations, graph pools, kernel workspaces
WEIGHT_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


# ---- what a step must read and compute ------------------------------------------------------

@dataclass
class StepCost:
    """The least one step moves and computes.

    Attributes:
        weight_bytes: weights read once (routed experts: only those hit).
        cache_bytes: latent cache rows read and written.
        output_bytes: float32 logits written.
        fp8_flops: FLOPs of the FP8 linears (held against the FP8 block-wise rate).
        dense_flops: the other FLOPs (attention, router, head; every linear when not FP8), against BF16.
    """

    weight_bytes: float
    cache_bytes: float
    output_bytes: float
    fp8_flops: float
    dense_flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes + self.output_bytes

    @property
    def flops(self) -> float:
        return self.fp8_flops + self.dense_flops


@dataclass
class Floor:
    """max(memory_ms, compute_ms) and which one it is."""

    memory_ms: float
    compute_ms: float

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)

    @property
    def limit(self) -> str:
        return "memory" if self.memory_ms >= self.compute_ms else "compute"


def step_floor(cost: StepCost, roofline: Roofline) -> Floor:
    """The floor of a step on the measured roofline (FP8 FLOPs at the BF16 rate where FP8 was not measured)."""
    fp8_rate = roofline.fp8_blockwise_tflops or roofline.bf16_tflops
    memory_ms = cost.bytes / (roofline.copy_gbps * 1e9) * 1e3
    compute_ms = (cost.fp8_flops / (fp8_rate * 1e12) + cost.dense_flops / (roofline.bf16_tflops * 1e12)) * 1e3
    return Floor(memory_ms, compute_ms)


def linear_bytes(out_features: int, in_features: int, precision: str) -> int:
    """A linear's stored weight: FP8 adds a float32 scale per 128x128 block."""
    weight = out_features * in_features * WEIGHT_BYTES[precision]
    if precision != "fp8":
        return weight
    return weight + 4 * math.ceil(out_features / BLOCK) * math.ceil(in_features / BLOCK)


def attention_linears(c: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one layer's MLA projections (kv_b_proj excepted: it runs absorbed, dense)."""
    heads, hidden = c.num_attention_heads, c.hidden_size
    if c.q_lora_rank is None:
        query = [(heads * c.qk_head_dim, hidden)]
    else:
        query = [(c.q_lora_rank, hidden), (heads * c.qk_head_dim, c.q_lora_rank)]
    return query + [(c.kv_lora_rank + c.qk_rope_head_dim, hidden), (hidden, heads * c.v_head_dim)]


def mlp_linears(hidden: int, inter: int) -> list[tuple[int, int]]:
    """(out, in) of gate, up and down."""
    return [(inter, hidden), (inter, hidden), (hidden, inter)]


def expert_bytes(c: ModelConfig, precision: str) -> int:
    """One routed expert's three linears."""
    return sum(linear_bytes(o, i, precision) for o, i in mlp_linears(c.hidden_size, c.moe_intermediate_size))


def _activation_bytes(precision: str) -> int:
    return torch.empty((), dtype=ACTIVATION_DTYPES[precision]).element_size()


def _absorbed_mla_bytes(c: ModelConfig, precision: str) -> int:
    """w_uk [H, nope, C] and w_uv [H, v, C] in the activation dtype."""
    return c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank * _activation_bytes(precision)


def _norm_bytes(c: ModelConfig, precision: str) -> int:
    return (2 * c.hidden_size + (c.q_lora_rank or 0) + c.kv_lora_rank) * _activation_bytes(precision)


def _shared_inter(c: ModelConfig) -> int:
    return c.moe_intermediate_size * (c.n_shared_experts or 0)


def layer_read_bytes(c: ModelConfig, index: int, precision: str, experts_hit: float) -> float:
    """Weight bytes layer `index` reads in one step, with `experts_hit` routed experts read."""
    total = sum(linear_bytes(o, i, precision) for o, i in attention_linears(c))
    total += _absorbed_mla_bytes(c, precision) + _norm_bytes(c, precision)
    if not c.is_moe_layer(index):
        return total + sum(linear_bytes(o, i, precision) for o, i in mlp_linears(c.hidden_size, c.intermediate_size))
    total += 4 * c.n_routed_experts * (c.hidden_size + 1)  # float32 router and correction bias
    total += experts_hit * expert_bytes(c, precision)
    if _shared_inter(c):
        total += sum(linear_bytes(o, i, precision) for o, i in mlp_linears(c.hidden_size, _shared_inter(c)))
    return total


def _linear_params_per_token(c: ModelConfig, index: int) -> int:
    """Multiply-adds per token of layer `index`'s linears (the routed experts: top_k of them)."""
    params = sum(o * i for o, i in attention_linears(c))
    if not c.is_moe_layer(index):
        return params + 3 * c.hidden_size * c.intermediate_size
    return params + 3 * c.hidden_size * (c.num_experts_per_tok * c.moe_intermediate_size + _shared_inter(c))


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a batch of `tokens` hits when each picks top_k of num_experts uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _moe_layers(c: ModelConfig) -> list[int]:
    return [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]


def _hits_per_layer(c: ModelConfig, tokens: int, experts_hit: Sequence[float] | None) -> dict[int, float]:
    moe = _moe_layers(c)
    if not moe:
        return {}
    if experts_hit is None:
        experts_hit = [expected_experts_hit(c.n_routed_experts, c.num_experts_per_tok, tokens)] * len(moe)
    if len(experts_hit) != len(moe):
        raise Dsv3Error(f"bench: {len(experts_hit)} expert counts for {len(moe)} MoE layers")
    return dict(zip(moe, experts_hit))


def _model_read_bytes(c: ModelConfig, precision: str, tokens: int, hits: dict[int, float]) -> float:
    """All weights a step reads: the layers, the embedding rows of `tokens`, the final norm, the head."""
    act = _activation_bytes(precision)
    layers = sum(layer_read_bytes(c, i, precision, hits.get(i, 0.0)) for i in range(c.num_hidden_layers))
    return layers + tokens * c.hidden_size * act + c.hidden_size * act + c.vocab_size * c.hidden_size * act


def decode_cost(c: ModelConfig, precision: str, batch: int, context: int,
                experts_hit: Sequence[float] | None = None) -> StepCost:
    """One decode step: `batch` sequences, each with `context` tokens cached, one new token each.

    Args:
        experts_hit: routed experts read per MoE layer (measured); None: expected_experts_hit.
    """
    act = _activation_bytes(precision)
    hits = _hits_per_layer(c, batch, experts_hit)
    width = c.kv_lora_rank + c.qk_rope_head_dim
    cache = c.num_hidden_layers * batch * (context + 1) * width * act
    linear_flops = 2.0 * batch * sum(_linear_params_per_token(c, i) for i in range(c.num_hidden_layers))
    heads, rank = c.num_attention_heads, c.kv_lora_rank
    attended = context + 1
    attention = 2.0 * batch * heads * (c.qk_nope_head_dim * rank + attended * width + attended * rank
                                       + rank * c.v_head_dim)
    router = 2.0 * batch * c.hidden_size * c.n_routed_experts * len(hits) if hits else 0.0
    head = 2.0 * batch * c.hidden_size * c.vocab_size
    dense = attention * c.num_hidden_layers + router + head
    fp8 = linear_flops if precision == "fp8" else 0.0
    return StepCost(_model_read_bytes(c, precision, batch, hits), cache, 4.0 * batch * c.vocab_size, fp8,
                    dense + (0.0 if precision == "fp8" else linear_flops))


def prefill_cost(c: ModelConfig, precision: str, tokens: int,
                 experts_hit: Sequence[float] | None = None) -> StepCost:
    """Prefill of `tokens` tokens of one empty sequence, up to the last token's logits.

    Attention is the non-absorbed form: latents expanded through kv_b_proj, then (query, key)
    pairs of the causal triangle at qk_head_dim + v_head_dim multiply-adds per head.
    """
    act = _activation_bytes(precision)
    hits = _hits_per_layer(c, tokens, experts_hit)
    width = c.kv_lora_rank + c.qk_rope_head_dim
    heads = c.num_attention_heads
    pairs = tokens * (tokens + 1) / 2
    linear_flops = 2.0 * tokens * sum(_linear_params_per_token(c, i) for i in range(c.num_hidden_layers))
    expansion = 2.0 * tokens * c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
    attention = 2.0 * pairs * heads * (c.qk_head_dim + c.v_head_dim)
    router = 2.0 * tokens * c.hidden_size * c.n_routed_experts * len(hits) if hits else 0.0
    dense = (expansion + attention) * c.num_hidden_layers + router + 2.0 * c.hidden_size * c.vocab_size
    fp8 = linear_flops if precision == "fp8" else 0.0
    return StepCost(_model_read_bytes(c, precision, tokens, hits), c.num_hidden_layers * tokens * width * act,
                    4.0 * c.vocab_size, fp8, dense + (0.0 if precision == "fp8" else linear_flops))


# ---- the model: how many layers fit, building it ----------------------------------------------

def bench_config(base: ModelConfig, layers: int) -> ModelConfig:
    """`base` with `layers` layers: up to first_k_dense_replace dense ones, then MoE (at least one)."""
    if layers < 1:
        raise Dsv3Error(f"bench: --layers must be at least 1, got {layers}")
    dense = min(base.first_k_dense_replace, layers - 1) if base.n_routed_experts else layers
    return base.replace(num_hidden_layers=layers, first_k_dense_replace=dense)


def model_weight_bytes(c: ModelConfig, precision: str) -> float:
    """The weights a backend keeps: every layer's (all experts; MLA's dense kv_b beside w_uk and w_uv),
    the embedding and the head."""
    tables = c.vocab_size * c.hidden_size * _activation_bytes(precision) * (1 if c.tie_word_embeddings else 2)
    layers = sum(layer_read_bytes(c, i, precision, c.n_routed_experts if c.is_moe_layer(i) else 0)
                 + _absorbed_mla_bytes(c, precision) for i in range(c.num_hidden_layers))
    return tables + layers


def model_memory_bytes(c: ModelConfig, precision: str, max_batch: int, max_seq: int) -> float:
    """The weights, every layer's latent cache, the logits buffers and a workspace."""
    cache = c.num_hidden_layers * max_batch * max_seq * (c.kv_lora_rank + c.qk_rope_head_dim) * \
        _activation_bytes(precision)
    return model_weight_bytes(c, precision) + cache + WORKSPACE_BYTES + 3 * 4 * max_batch * c.vocab_size


def fit_layers(base: ModelConfig, precision: str, free_bytes: float, max_batch: int, max_seq: int,
               headroom: float = HEADROOM) -> int:
    """The most layers (bench_config) whose model takes at most (1 - headroom) of `free_bytes`."""
    budget = free_bytes * (1.0 - headroom)
    fitting = 0
    for layers in range(1, base.num_hidden_layers + 1):
        if model_memory_bytes(bench_config(base, layers), precision, max_batch, max_seq) > budget:
            break
        fitting = layers
    if fitting == 0:
        need = model_memory_bytes(bench_config(base, 1), precision, max_batch, max_seq)
        raise Dsv3Error(f"bench: one layer needs {need / 1e9:.1f} GB with the cache for batch {max_batch} x "
                        f"{max_seq} tokens; {free_bytes / 1e9:.1f} GB are free (keeping {headroom:.0%})")
    return fitting


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` after releasing cached blocks; None where torch cannot tell (the CPU)."""
    gc.collect()
    module = torch.get_device_module(device)
    if hasattr(module, "empty_cache"):
        module.empty_cache()
    info = getattr(module, "mem_get_info", None)
    return int(info(device)[0]) if info is not None else None


def build_model(config: ModelConfig, backend: Backend, precision: str, max_batch: int, max_seq: int,
                seed: int = 0) -> Transformer:
    """The model with synthetic weights made on the backend's device (experts stacked there directly)."""
    started = time.perf_counter()
    source = RandomSource(config, fp8=precision == "fp8", seed=seed, device=backend.device, fast=True)
    loader = WeightLoader(source, config, progress=False)
    try:
        model = Transformer(config, backend, loader, precision, max_batch, max_seq)
    except torch.OutOfMemoryError as e:
        raise Dsv3Error(f"bench: {config.num_hidden_layers} layers with a cache for batch {max_batch} x {max_seq} "
                        f"tokens do not fit on {backend.device} (pass fewer --layers): {str(e).splitlines()[0]}")
    finally:
        loader.close()
    print(f"dsv3 bench: built {config.num_hidden_layers} layers on the {backend.capabilities.name} backend in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return model


def fill_caches(model: Transformer, seed: int = 0) -> None:
    """Random values in every cache position (the tokens a long prefill would have left)."""
    g = torch.Generator(model.backend.device).manual_seed(seed)
    for cache in model.caches:
        cache.normal_(generator=g)


def prefill_last_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill tokens [1, T] into cache row 0 from position 0; float32 logits [1, V] of the last token
    only (what generation needs; Transformer.prefill projects every position)."""
    slots = torch.zeros(1, dtype=torch.long, device=tokens.device)
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    state = ForwardState(slots, positions, 0, model.cos[positions], model.sin[positions])
    return model.project(model.hidden(tokens, state)[:, -1])


class ExpertCounter:
    """Counts the distinct routed experts each MoE layer runs, by wrapping backend.moe_experts."""

    def __init__(self, backend: Backend):
        self.backend, self.hits = backend, []

    def __enter__(self) -> "ExpertCounter":
        original = self.backend.moe_experts

        def counting(x, weights, ids, experts):
            self.hits.append(int(ids.unique().numel()))
            return original(x, weights, ids, experts)

        self.backend.moe_experts = counting  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.backend.moe_experts


# ---- timing and profile ----------------------------------------------------------------------

def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 2, target_ms: float = 300.0,
               min_reps: int = 3, max_reps: int = 20) -> tuple[float, int]:
    """(median ms per call, calls timed): each call between two device events (host clock on the CPU)."""
    device = torch.device(device)
    events = device.type != "cpu"

    def sync():
        if events:
            torch.accelerator.synchronize(device)

    def mark():
        if not events:
            return time.perf_counter()
        event = torch.Event(device=device, enable_timing=True)
        event.record()
        return event

    def elapsed(start, end) -> float:
        return start.elapsed_time(end) if events else (end - start) * 1e3

    for _ in range(warmup):
        fn()
    sync()
    started = time.perf_counter()
    fn()
    sync()
    per_call_s = time.perf_counter() - started
    reps = int(min(max_reps, max(min_reps, target_ms * 1e-3 / max(per_call_s, 1e-6))))
    marks = []
    for _ in range(reps):
        start = mark()
        fn()
        marks.append((start, mark()))
        if not events:
            sync()
    sync()
    return statistics.median(elapsed(s, e) for s, e in marks), reps


def profile_step(fn: Callable[[], object], steps: int = 3, top: int = 15) -> dict:
    """The top kernels (device time; CPU ops where no device activity is recorded) of `steps` calls.

    Returns:
        {"by": "device" or "cpu", "step_us": time per step summed over every row, "rows": [{"name",
        "calls_per_step", "us_per_step", "percent"}]}.
    """
    from torch.autograd import DeviceType
    from torch.profiler import profile, supported_activities

    fn()
    with profile(activities=list(supported_activities())) as prof:
        for _ in range(steps):
            fn()
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()
    averages = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    kernels = [e for e in averages if e.device_type != DeviceType.CPU and device_us(e) > 0]
    if kernels:
        by, rows = "device", [(e.key, e.count, device_us(e)) for e in kernels]
    else:
        by, rows = "cpu", [(e.key, e.count, float(e.self_cpu_time_total)) for e in averages]
    total = sum(us for _, _, us in rows) / steps
    rows.sort(key=lambda row: -row[2])
    return {"by": by, "steps": steps, "step_us": total,
            "rows": [{"name": name, "calls_per_step": count / steps, "us_per_step": us / steps,
                      "percent": 100.0 * us / steps / total if total else 0.0} for name, count, us in rows[:top]]}


def format_profile(profile: dict) -> str:
    lines = [f"top {len(profile['rows'])} by {profile['by']} time, {profile['step_us'] / 1e3:.3f} ms per step "
             f"({profile.get('what', '')})",
             f"{'us/step':>10} {'%':>6} {'calls':>6}  name"]
    for row in profile["rows"]:
        lines.append(f"{row['us_per_step']:10.1f} {row['percent']:6.1f} {row['calls_per_step']:6.1f}  "
                     f"{row['name'][:100]}")
    return "\n".join(lines)


# ---- records -------------------------------------------------------------------------------

@dataclass
class StepRecord:
    """One implementation timed on one case.

    Attributes:
        what: "decode" or "prefill".
        impl: who ran it, e.g. "dsv3 cuda (graph)", "reference backend (eager)".
        ours: dsv3's optimised backend (the reference is the peer).
        batch: sequences in the step.
        context: decode: tokens already cached per sequence; prefill: tokens processed.
        layers: transformer layers of the model timed.
        time_ms: median time of one step; None where it failed.
        tokens_per_s: tokens produced (decode: batch) or processed (prefill) per second.
        floor_ms, memory_ms, compute_ms, limit: the floor and its two terms.
        vs_floor: time / floor (1.0 is the floor).
        fp8_rate_pct: prefill: all the step's FLOPs over the time, in percent of the FP8 block-wise rate.
        experts_hit: routed experts run per MoE layer (mean, counted in the run).
        vs_reference: reference time / this time (same case), where the reference ran.
        cost: the bytes and FLOPs behind the floor.
        note, error: remarks; why it failed.
    """

    what: str
    impl: str
    ours: bool
    batch: int
    context: int
    layers: int
    time_ms: float | None = None
    tokens_per_s: float | None = None
    floor_ms: float | None = None
    memory_ms: float | None = None
    compute_ms: float | None = None
    limit: str = ""
    vs_floor: float | None = None
    fp8_rate_pct: float | None = None
    experts_hit: float | None = None
    vs_reference: float | None = None
    cost: dict = field(default_factory=dict)
    note: str = ""
    error: str | None = None


def make_record(what: str, impl: str, ours: bool, batch: int, context: int, layers: int, cost: StepCost,
                roofline: Roofline, time_ms: float | None, tokens: int, experts_hit: Sequence[float] | None,
                note: str = "", error: str | None = None) -> StepRecord:
    floor = step_floor(cost, roofline)
    record = StepRecord(what, impl, ours, batch, context, layers, time_ms, floor_ms=floor.ms,
                        memory_ms=floor.memory_ms, compute_ms=floor.compute_ms, limit=floor.limit,
                        experts_hit=statistics.fmean(experts_hit) if experts_hit else None,
                        cost=asdict(cost), note=note, error=error)
    if time_ms:
        record.tokens_per_s = tokens / (time_ms * 1e-3)
        record.vs_floor = time_ms / floor.ms
        if what == "prefill" and roofline.fp8_blockwise_tflops:
            record.fp8_rate_pct = 100.0 * cost.flops / (time_ms * 1e-3) / (roofline.fp8_blockwise_tflops * 1e12)
    return record


def link_reference(records: list[StepRecord]) -> None:
    """Fill vs_reference of every row whose case the reference also ran."""
    reference = {(r.what, r.batch, r.context): r.time_ms for r in records if not r.ours and r.time_ms}
    for r in records:
        peer = reference.get((r.what, r.batch, r.context))
        if r.ours and r.time_ms and peer:
            r.vs_reference = peer / r.time_ms


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_records(records: list[StepRecord]) -> str:
    """A plain-text table, one row per record."""
    header = ["impl", "batch", "context", "layers", "ms/step", "tokens/s", "floor ms", "x floor", "% fp8",
              "experts/layer", "vs reference", "note"]
    rows = [header]
    for r in records:
        if r.error:
            rows.append([r.impl, str(r.batch), str(r.context), str(r.layers), "fails", "", "", "", "", "", "",
                         r.error[:80]])
            continue
        rows.append([r.impl, str(r.batch), str(r.context), str(r.layers), _fmt(r.time_ms, ".3f"),
                     _fmt(r.tokens_per_s, ".1f"), f"{_fmt(r.floor_ms, '.3f')} {r.limit[:3]}",
                     _fmt(r.vs_floor, ".2f"), _fmt(r.fp8_rate_pct, ".0f"), _fmt(r.experts_hit, ".1f"),
                     "-" if r.vs_reference is None else f"{r.vs_reference:.1f}x", r.note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_lines(payload: dict) -> list[str]:
    """The issue's targets against one run's records (decode: x floor and vs reference at batch 1 and
    64, graph mode; prefill: percent of the FP8 rate)."""
    lines = []
    rows = [r for r in payload.get("records", []) if r["ours"] and not r.get("error") and r["time_ms"] is not None]
    graphed = {(r["batch"], r["context"]) for r in rows if r["what"] == "decode" and r["impl"].endswith("(graph)")}
    for r in rows:
        replayed = r["impl"].endswith("(graph)") or (r["batch"], r["context"]) not in graphed
        if r["what"] == "decode" and replayed and r["batch"] in (1, 64):
            ref = f", {r['vs_reference']:.1f}x the reference (target >= 10x)" if r.get("vs_reference") else ""
            lines.append(f"decode batch {r['batch']} context {r['context']}: {r['time_ms']:.3f} ms, "
                         f"{r['vs_floor']:.2f}x the floor (target <= 1.5){ref}")
        if r["what"] == "prefill":
            pct = f"{r['fp8_rate_pct']:.0f}%" if r.get("fp8_rate_pct") is not None else "-"
            lines.append(f"prefill {r['context']} tokens: {r['time_ms']:.1f} ms, {r['tokens_per_s']:.0f} tokens/s, "
                         f"{pct} of the FP8 block-wise rate (target >= 40%), {r['vs_floor']:.2f}x the floor")
    return lines


class Report:
    """The run's records, written to JSON after each one (a run cut short keeps what it timed)."""

    def __init__(self, what: str, backend: Backend, roofline: Roofline, path: str | None, model: dict):
        self.path, self.records = path, []
        self.payload = {"what": what, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "device": roofline.device_name, "backend": backend.capabilities.name,
                        "ops": dict(backend.capabilities.ops), "model": model, "roofline": asdict(roofline),
                        "environment": environment(), "notes": [], "profile": None}

    def add(self, record: StepRecord) -> None:
        self.records.append(record)
        link_reference(self.records)
        lines = format_records([record]).splitlines()
        print("\n".join(lines if len(self.records) == 1 else lines[-1:]), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            self.payload["records"] = [asdict(r) for r in self.records]
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.payload, indent=1))


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _describe(config: ModelConfig, precision: str, max_batch: int, max_seq: int, free: int | None) -> dict:
    moe = _moe_layers(config)
    return {"config": config.source, "layers": config.num_hidden_layers,
            "dense_layers": config.num_hidden_layers - len(moe), "moe_layers": len(moe),
            "precision": precision, "max_batch_size": max_batch, "max_seq_len": max_seq,
            "weights_gb": model_weight_bytes(config, precision) / 1e9,
            "free_memory_gb": None if free is None else free / 1e9}


# ---- the runs ---------------------------------------------------------------------------------

def _setup(what: str, backend: Backend, base: ModelConfig, layers: int | None, max_batch: int, max_seq: int,
           quick: bool, json_path: str | None) -> tuple[ModelConfig, str, Roofline, Report]:
    precision = "fp8" if backend.capabilities.has_fp8 else "bf16"
    if max_seq > base.max_position_embeddings:
        raise Dsv3Error(f"bench: {max_seq} positions exceed the config's max_position_embeddings="
                        f"{base.max_position_embeddings}")
    device = backend.device
    on_host = device.type == "cpu"  # a small roofline there: 8192^3 would take minutes
    roofline = measure_roofline(device, backend.capabilities.fp8_dtype, size=512 if on_host else 8192,
                                copy_bytes=(32 << 20) if on_host else (1 << 30))
    print(format_roofline(roofline) + (" (on the CPU: matmul 512^3)" if on_host else ""), flush=True)
    free = free_memory(device)
    if layers is None:
        layers = base.num_hidden_layers if free is None else fit_layers(base, precision, free, max_batch, max_seq)
    config = bench_config(base, layers)
    report = Report(what, backend, roofline, json_path, _describe(config, precision, max_batch, max_seq, free))
    m = report.payload["model"]
    print(f"dsv3 bench {what}: {m['layers']} layers ({m['dense_layers']} dense, {m['moe_layers']} MoE) of "
          f"{Path(str(base.source)).stem}, {precision} weights {m['weights_gb']:.1f} GB, cache for batch "
          f"{max_batch} x {max_seq} tokens" + (f", {free / 1e9:.1f} GB were free" if free else ""), flush=True)
    return config, precision, roofline, report


def run_decode(backend: Backend, base: ModelConfig, layers: int | None = None,
               batches: Sequence[int] = DECODE_BATCHES, contexts: Sequence[int] = CONTEXTS,
               quick: bool = False, reference: bool = True, json_path: str | None = None,
               profile: bool = True) -> list[StepRecord]:
    """Time decode steps of `backend` (graph and eager) and of the reference backend; returns the records."""
    device = backend.device
    max_batch, max_seq = max(batches), max(contexts) + 1
    config, precision, roofline, report = _setup("decode", backend, base, layers, max_batch, max_seq, quick,
                                                 json_path)
    model = build_model(config, backend, precision, max_batch, max_seq)
    fill_caches(model)
    runner = DecodeRunner(model, graphs=True)
    name = backend.capabilities.name
    g = torch.Generator(device).manual_seed(1)
    with torch.inference_mode():
        if profile:  # before any graph exists: the profiler is known to misbehave when graphs came first
            _profile_decode(model, report, PROFILE_BATCH if PROFILE_BATCH in batches else max(batches),
                            contexts[0], g)
        for batch in sorted(batches):
            tokens = torch.randint(0, config.vocab_size, (batch,), device=device, generator=g)
            slots = torch.arange(batch, device=device)
            hits = None
            for context in contexts:
                positions = torch.full((batch,), context, device=device)
                if hits is None:
                    with ExpertCounter(backend) as counter:
                        model.decode(tokens, slots, positions)
                    hits = counter.hits or None
                cost = decode_cost(config, precision, batch, context, hits)
                for mode in ("graph", "eager") if runner.graphs else ("eager",):
                    if mode == "graph":
                        fn = lambda: runner(tokens, slots, positions)  # noqa: E731
                    else:
                        fn = lambda: model.decode(tokens, slots, positions)  # noqa: E731
                    record = partial(make_record, "decode", f"dsv3 {name} ({mode})", True, batch, context,
                                     config.num_hidden_layers, cost, roofline)
                    try:
                        if mode == "graph":
                            fn()  # records this bucket, or learns that the backend records none
                            if not runner.graphs:
                                report.payload["notes"].append(f"backend {name} records no graphs: decode is eager")
                                continue
                        ms, reps = time_calls(fn, device, warmup=1 if quick else 2,
                                              target_ms=100.0 if quick else 300.0, min_reps=2 if quick else 3)
                    except Exception as e:  # noqa: BLE001 - a failure is a result
                        report.add(record(None, batch, hits, error=_error(e)))
                        continue
                    report.add(record(ms, batch, hits, note=f"{reps} steps"))
    del runner, model
    free_memory(device)
    if reference and name != "reference":
        _time_reference(backend, config, precision, roofline, report, contexts)
    print(format_records(report.records))
    for line in summary_lines(report.payload):
        print(line)
    report.save()
    return report.records


def _profile_decode(model: Transformer, report: Report, batch: int, context: int, generator) -> None:
    """Profile one eager decode step (the kernels a graph replays, each seen by the profiler)."""
    device = model.backend.device
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device, generator=generator)
    slots, positions = torch.arange(batch, device=device), torch.full((batch,), context, device=device)
    try:
        result = profile_step(lambda: model.decode(tokens, slots, positions))
        result["what"] = f"decode batch {batch} context {context}, kernels of an eager step"
        print(format_profile(result), flush=True)
    except Exception as e:  # noqa: BLE001 - no profile is a result, not a failed run
        result = {"error": _error(e)}
    report.payload["profile"] = result
    report.save()


def _time_reference(backend: Backend, config: ModelConfig, precision: str, roofline: Roofline, report: Report,
                    contexts: Sequence[int]) -> None:
    """The reference backend on the same device at batch 1 (eager; few steps: it is slow)."""
    from backends.reference import ReferenceBackend

    device = backend.device
    reference = ReferenceBackend(device)
    try:
        model = build_model(config, reference, precision, 1, max(contexts) + 1)
    except Exception as e:  # noqa: BLE001
        report.payload["notes"].append(f"reference backend not timed: {_error(e)}")
        return
    fill_caches(model)
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1,), device=device, generator=g)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        for context in contexts:
            positions = torch.full((1,), context, device=device)
            cost = decode_cost(config, precision, 1, context, None)
            try:
                ms, reps = time_calls(lambda: model.decode(tokens, slots, positions), device, warmup=1,
                                      target_ms=0.0, min_reps=2, max_reps=2)
            except Exception as e:  # noqa: BLE001
                report.add(make_record("decode", "reference backend (eager)", False, 1, context,
                                       config.num_hidden_layers, cost, roofline, None, 1, None, error=_error(e)))
                continue
            report.add(make_record("decode", "reference backend (eager)", False, 1, context,
                                   config.num_hidden_layers, cost, roofline, ms, 1, None,
                                   note=f"{reps} steps, the same layers"))
    del model
    free_memory(device)


def run_prefill(backend: Backend, base: ModelConfig, layers: int | None = None, tokens: int = PREFILL_TOKENS,
                quick: bool = False, json_path: str | None = None) -> list[StepRecord]:
    """Time a prefill of `tokens` tokens (batch 1) up to the last token's logits; returns the records."""
    device = backend.device
    config, precision, roofline, report = _setup("prefill", backend, base, layers, 1, tokens, quick, json_path)
    model = build_model(config, backend, precision, 1, tokens)
    name = backend.capabilities.name
    g = torch.Generator(device).manual_seed(2)
    prompt = torch.randint(0, config.vocab_size, (1, tokens), device=device, generator=g)
    with torch.inference_mode():
        with ExpertCounter(backend) as counter:
            prefill_last_logits(model, prompt)
        hits = counter.hits or None
        cost = prefill_cost(config, precision, tokens, hits)
        impl = f"dsv3 {name} (eager)"
        try:
            ms, reps = time_calls(lambda: prefill_last_logits(model, prompt), device, warmup=1,
                                  target_ms=100.0 if quick else 500.0, min_reps=3, max_reps=10)
            report.add(make_record("prefill", impl, True, 1, tokens, config.num_hidden_layers, cost, roofline, ms,
                                   tokens, hits, note=f"{reps} steps"))
        except Exception as e:  # noqa: BLE001
            report.add(make_record("prefill", impl, True, 1, tokens, config.num_hidden_layers, cost, roofline, None,
                                   tokens, hits, error=_error(e)))
    del model
    free_memory(device)
    print(format_records(report.records))
    for line in summary_lines(report.payload):
        print(line)
    report.save()
    return report.records


def run_command(args, backend: Backend) -> int:
    """`dsv3 bench decode|prefill` (dsv3/commands/bench.py parses the options)."""
    from dsv3.config import load_config

    base = load_config(args.config)
    for name in ("batch", "context"):
        if any(v < 1 for v in getattr(args, name) or ()):
            raise Dsv3Error(f"bench: --{name} values must be positive, got {getattr(args, name)}")
    if args.tokens < 1:
        raise Dsv3Error(f"bench: --tokens must be positive, got {args.tokens}")
    if args.what == "prefill":
        run_prefill(backend, base, args.layers, args.tokens, args.quick, args.json)
        return 0
    batches = tuple(args.batch or (QUICK_BATCHES if args.quick else DECODE_BATCHES))
    contexts = args.context or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    longest = base.max_position_embeddings - 1
    if max(contexts) > longest:
        print(f"dsv3 bench: contexts above {longest} (the config's max_position_embeddings - 1) become {longest}",
              file=sys.stderr)
    contexts = tuple(dict.fromkeys(min(c, longest) for c in contexts))
    run_decode(backend, base, args.layers, batches, contexts, args.quick, not args.no_reference, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.bench.e2e FILE...`: saved decode/prefill runs in short: the table, the targets, the
    top kernels."""
    paths = sys.argv[1:] if argv is None else argv
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        model = payload.get("model", {})
        print(f"{path}: {payload.get('device')}, {model.get('layers')} layers ({model.get('dense_layers')} dense, "
              f"{model.get('moe_layers')} MoE), {payload.get('date')}")
        records = [StepRecord(**r) for r in payload.get("records", [])]
        if records:
            print(format_records(records))
        for line in summary_lines(payload) or ["no timed rows"]:
            print("  " + line)
        for note in payload.get("notes", []):
            print("  note: " + note)
        profile = payload.get("profile") or {}
        if profile.get("rows"):
            print(format_profile({**profile, "rows": profile["rows"][:8]}))
        elif profile.get("error"):
            print(f"  profile failed: {profile['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
