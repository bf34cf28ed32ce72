"""What a whole-model bench step costs and how a timed step is recorded: the cost model (StepCost:
the bytes a decode or prefill step must read and the FLOPs it must do, at DeepSeek-V3's layer
dimensions), its floor on the measured roofline (step_floor), a timed step's record (make_record, a
common.Record) and the targets it speaks to (summary_lines).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from dsv3.backends.fp8 import BLOCK
from dsv3.bench.common import Record, Roofline
from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.model import ACTIVATION_DTYPES

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


# ---- records -------------------------------------------------------------------------------

def make_record(what: str, impl: str, ours: bool, batch: int, context: int, layers: int, cost: StepCost,
                roofline: Roofline, time_ms: float | None, tokens: int, experts_hit: Sequence[float] | None,
                note: str = "", error: str | None = None) -> Record:
    """The record of one timed step: one implementation on one case.

    Args:
        what: "decode" or "prefill".
        impl: who ran it, e.g. "dsv3 cuda (graph)", "reference backend (eager)".
        ours: dsv3's optimised backend (the reference is the peer).
        batch: sequences in the step.
        context: decode: tokens already cached per sequence; prefill: tokens processed.
        layers: transformer layers of the model timed.
        cost: the bytes and FLOPs behind the floor.
        time_ms: median time of one step; None where it failed.
        tokens: tokens produced (decode: batch) or processed (prefill) by the step.
        experts_hit: routed experts run per MoE layer, counted in the run.
        note, error: remarks; why it failed.
    Returns:
        A Record whose metrics hold batch, context, layers; tokens_per_s; floor_ms, memory_ms, compute_ms and
        limit (the floor and its two terms); vs_floor (time / floor); fp8_rate_pct (prefill: all the step's
        FLOPs over the time, in percent of the FP8 block-wise rate); experts_hit (the mean); vs_reference
        (reference time / this time, filled by link_reference); cost; note.
    """
    floor = step_floor(cost, roofline)
    metrics = {"batch": batch, "context": context, "layers": layers, "tokens_per_s": None, "floor_ms": floor.ms,
               "memory_ms": floor.memory_ms, "compute_ms": floor.compute_ms, "limit": floor.limit, "vs_floor": None,
               "fp8_rate_pct": None, "experts_hit": statistics.fmean(experts_hit) if experts_hit else None,
               "vs_reference": None, "cost": asdict(cost), "note": note}
    if time_ms:
        metrics["tokens_per_s"] = tokens / (time_ms * 1e-3)
        metrics["vs_floor"] = time_ms / floor.ms
        if what == "prefill" and roofline.fp8_blockwise_tflops:
            metrics["fp8_rate_pct"] = 100.0 * cost.flops / (time_ms * 1e-3) / (roofline.fp8_blockwise_tflops * 1e12)
    return Record(what, impl, ours, time_ms, error, metrics)


def _case(r: Record) -> tuple:
    return r.what, r.metrics["batch"], r.metrics["context"]


def link_reference(records: list[Record]) -> None:
    """Fill vs_reference of every row whose case the reference also ran."""
    reference = {_case(r): r.time_ms for r in records if not r.ours and r.time_ms}
    for r in records:
        peer = reference.get(_case(r))
        if r.ours and r.time_ms and peer:
            r.metrics["vs_reference"] = peer / r.time_ms


#: DeepSeek-V3's targets (docs/performance.md): x floor of a decode step by batch, FP8 rate of a prefill
DECODE_FLOOR_TARGETS = {1: 1.4, 64: 1.3}
PREFILL_FP8_TARGET_PCT = 50


def summary_lines(records: Sequence[Record]) -> list[str]:
    """The targets against one run's records (decode: x floor and vs reference at batch 1 and
    64, graph mode; prefill: percent of the FP8 rate)."""
    lines = []
    rows = [r for r in records if r.ours and not r.error and r.time_ms is not None]
    graphed = {_case(r) for r in rows if r.what == "decode" and r.impl.endswith("(graph)")}
    for r in rows:
        m = r.metrics
        replayed = r.impl.endswith("(graph)") or _case(r) not in graphed
        if r.what == "decode" and replayed and m["batch"] in DECODE_FLOOR_TARGETS:
            ref = f", {m['vs_reference']:.1f}x the reference (target >= 10x)" if m["vs_reference"] else ""
            lines.append(f"decode batch {m['batch']} context {m['context']}: {r.time_ms:.3f} ms, "
                         f"{m['vs_floor']:.2f}x the floor (V3 target <= {DECODE_FLOOR_TARGETS[m['batch']]}){ref}")
        if r.what == "prefill":
            pct = "-" if m["fp8_rate_pct"] is None else f"{m['fp8_rate_pct']:.0f}%"
            lines.append(f"prefill {m['context']} tokens: {r.time_ms:.1f} ms, {m['tokens_per_s']:.0f} tokens/s, "
                         f"{pct} of the FP8 block-wise rate (V3 target >= {PREFILL_FP8_TARGET_PCT}%), "
                         f"{m['vs_floor']:.2f}x the floor")
    return lines
