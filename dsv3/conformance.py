"""The conformance suite: every backend op, at every precision, on DeepSeek shapes and adversarial
inputs, compared with the reference backend on the same device.

A case builds its inputs on the CPU from a seed, runs the op once on the reference backend (built
with the tested backend's FP8 format and max) and once on the tested backend, and checks the two:

- "close": every output row (the last dim) within the tolerance of its op and precision;
- "propagate": rows fed a NaN/inf come out non-finite and no other row changes (or the op rejects
  the input with a ValueError or Dsv3Error);
- "route": the same experts per token wherever the reference's choice is not a near-tie, and close
  weights; out-of-range or repeated expert ids fail;
- "logits": model logits at bf16/fp8 as "close", or, where the tiny model amplifies rounding, no farther
  from the exact fp32 logits than the reference at that precision is;
- "greedy": the same greedy tokens, or a first divergence where the reference's top two logits tie.

The reference row is not vacuous: the propagate checks, the finite-output checks and the exact zero
rows are absolute properties that the reference itself must meet.

This module imports no vendor module; the tested backend comes in as a Backend object.
"""

from __future__ import annotations

import datetime
import math
import platform
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from backends import fp8
from backends.interface import OPS, Backend, RoutingConfig
from backends.reference import ReferenceBackend
from dsv3.config import load_config
from dsv3.errors import Dsv3Error
from dsv3.model import ACTIVATION_DTYPES, rope_tables

PASS, FAIL, SKIPPED, EMULATED = "pass", "fail", "skipped", "emulated"
MODEL = "model"  # the op name of the model-level checks on the tiny checkpoint
SUITE_OPS: tuple[str, ...] = OPS + (MODEL,)
SUITE_PRECISIONS: tuple[str, ...] = ("fp8", "bf16", "fp32")


@dataclass(frozen=True)
class Tolerance:
    """What a case of one op and precision may differ from the reference.

    Attributes:
        error: max over output rows of max|out - ref| / max|ref| in that row (a row whose reference
            is all zero is divided by 1e-6 x the tensor's max, so it must come out zero).
        tie: moe_route only: tokens whose reference choice is within this relative margin of a tie
            are not compared (a rounding difference may rightly pick the other expert).
    """

    error: float
    tie: float | None = None


#: The one tolerance table: op -> precision -> Tolerance. bf16 outputs are rounded to 8 bits
#: (2^-8 = 3.9e-3 per rounding), so 1.6e-2 allows four roundings; fp32 GEMM-like ops allow
#: TF32-class tensor-core math; the model allows the error of 3 layers of bf16.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "linear_fp8": {"fp8": Tolerance(2e-2)},
    "linear_bf16": {"bf16": Tolerance(1.6e-2), "fp32": Tolerance(2e-3)},
    "rms_norm": {"bf16": Tolerance(1.6e-2), "fp32": Tolerance(1e-5)},
    "rotary": {"bf16": Tolerance(1.6e-2), "fp32": Tolerance(1e-5)},
    "swiglu": {"bf16": Tolerance(1.6e-2), "fp32": Tolerance(1e-5)},
    "mla_prefill": {"bf16": Tolerance(2e-2), "fp32": Tolerance(2e-3)},
    "mla_decode": {"bf16": Tolerance(2e-2), "fp32": Tolerance(2e-3)},
    "moe_route": {"bf16": Tolerance(2e-2, tie=2e-3), "fp32": Tolerance(1e-3, tie=5e-4)},
    "moe_experts": {"fp8": Tolerance(3e-2), "bf16": Tolerance(2e-2), "fp32": Tolerance(2e-3)},
    MODEL: {"fp8": Tolerance(5e-2), "bf16": Tolerance(5e-2), "fp32": Tolerance(2e-3)},
}


@dataclass(frozen=True)
class Plan:
    """How big the cases are: "quick" for a CPU in seconds, "full" for an accelerator.

    Attributes:
        linear_shapes: (N, K) of linears from DeepSeek-V3 (q_a, q_b, kv_b, o, shared/dense, expert down).
        token_counts: M (tokens) of the small-batch cases.
        large_tokens: M of the large-batch cases.
        large_batch: sequences of the large-batch attention cases.
        long_seq: tokens of the long-sequence attention and rotary cases.
        experts: (experts, hidden, intermediate, FP8 checkpoint, experts per token) of the MoE cases.
        extra_experts: another real expert shape that gets one case of its own at fp8 and bf16, or None.
    """

    name: str
    linear_shapes: tuple[tuple[int, int], ...]
    token_counts: tuple[int, ...]
    large_tokens: int
    large_batch: int
    long_seq: int
    experts: tuple[int, int, int, bool, int]
    extra_experts: tuple[int, int, int, bool, int] | None


V3_LINEAR_SHAPES = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
V3_EXPERTS = (16, 7168, 2048, True, 8)  # 16 of the 256 experts, FP8 checkpoint, top-8
LITE_EXPERTS = (16, 2048, 1408, False, 6)  # V2-Lite: 16 of the 64 experts, BF16 checkpoint, top-6
PLANS = {
    # the reference's FP8 emulation converts every weight block on the CPU: quick keeps experts few and small
    "quick": Plan("quick", ((2112, 7168), (7168, 2048)), (1, 16), 128, 16, 512, (8, 2048, 1408, False, 6),
                  (2, 7168, 2048, True, 2)),
    "full": Plan("full", V3_LINEAR_SHAPES, (1, 16), 1024, 64, 4096, V3_EXPERTS, LITE_EXPERTS),
}

#: The routing of each DeepSeek generation: (hidden size, experts, config), from the released configs.
ROUTINGS: dict[str, tuple[int, int, RoutingConfig]] = {
    "noaux_tc": (7168, 256, RoutingConfig("sigmoid", "noaux_tc", 8, 8, 4, True, 2.5)),  # V3 / R1
    "group_limited_greedy": (5120, 160, RoutingConfig("softmax", "group_limited_greedy", 6, 8, 3, False, 16.0)),  # V2
    "greedy": (2048, 64, RoutingConfig("softmax", "greedy", 6, 1, 1, False, 1.0)),  # V2-Lite
}

# MLA dims shared by V3 and V2(-Lite): per-head nope/rope/value dims and the latent rank.
NOPE, ROPE, VALUE, RANK = 128, 64, 128, 512
V3_HEADS, LITE_HEADS = 128, 16
PREFILL_CHUNK = 512


# ---- cases and results ---------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Attributes:
        op: an interface op (OPS) or "model".
        precision: "fp8", "bf16" or "fp32".
        name: what the case exercises, e.g. "2112x7168 M=16".
        inputs: (context) -> dict of CPU tensors and settings, the same on every call.
        call: (backend, inputs on its device) -> a tensor, a tuple of tensors or a Greedy.
        check: "close", "propagate" (inputs["poisoned"] marks the output rows fed a NaN/inf),
            "route" or "greedy".
    """

    op: str
    precision: str
    name: str
    inputs: Callable[["Context"], dict]
    call: Callable[[Backend, dict], Any]
    check: str = "close"


@dataclass
class Result:
    """The outcome of one case: status, the measured error and its tolerance, and why."""

    op: str
    precision: str
    case: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        error = self.error if self.error is None or math.isfinite(self.error) else str(self.error)  # "inf", "nan"
        return dict(op=self.op, precision=self.precision, case=self.case, status=self.status, error=error,
                    tolerance=self.tolerance, detail=self.detail, seconds=round(self.seconds, 3))


@dataclass
class Report:
    """A conformance run: what ran where, and one Result per case."""

    backend: str
    requested: str
    reason: str
    device: str
    device_name: str
    emulation: str | None
    fp8_format: str | None
    fp8_max: float | None
    precision: str | None
    plan: str
    date: str
    torch_version: str
    built: bool = True
    results: list[Result] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (pass, emulated or skipped), 1 on any failure."""
        return 1 if self.count(FAIL) else 0

    def to_json(self) -> dict:
        counts = {s: self.count(s) for s in (PASS, EMULATED, FAIL, SKIPPED)}
        return dict(schema=1, date=self.date, device=self.device, device_name=self.device_name, built=self.built,
                    backend=self.backend, requested=self.requested, reason=self.reason, emulation=self.emulation,
                    fp8_format=self.fp8_format, fp8_max=self.fp8_max, precision=self.precision, plan=self.plan,
                    torch=self.torch_version, platform=platform.platform(), counts=counts,
                    tolerances={op: {p: t.error for p, t in row.items()} for op, row in TOLERANCES.items()},
                    rows=[r.to_json() for r in self.results])


@dataclass
class Greedy:
    """Greedy continuations of a model-level case, with the model (to look at near-ties)."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    model: Any


class Context:
    """Inputs shared by several cases (checkpoint weights, rope tables, the tiny checkpoint), built once."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._memo: dict[Any, Any] = {}

    def memo(self, key, build: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g) * scale


# ---- shared inputs -------------------------------------------------------------------------

def fp8_weight(ctx: Context, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint-style e4m3fn weight [n, k] with 128x128 block scales (values ~ N(0, 1/k))."""
    weight, scale = ctx.memo(("fp8", n, k),
                             lambda: fp8.quantize_blocks(randn(generator(f"w{n}x{k}"), n, k, scale=k ** -0.5)))
    return weight.clone(), scale.clone()  # a backend that converts in place must not change the next case


def expert_weights(ctx: Context, num_experts: int, hidden: int, inter: int, fp8_checkpoint: bool) -> dict:
    """Stacked experts as the loader gives them: gate_up [E, 2I, D], down [E, D, I] (+ scales if FP8)."""
    def build():
        g = generator(f"experts{num_experts}x{hidden}x{inter}")
        gate_up, down = randn(g, num_experts, 2 * inter, hidden, scale=hidden ** -0.5), \
            randn(g, num_experts, hidden, inter, scale=inter ** -0.5)
        if not fp8_checkpoint:
            return dict(gate_up=gate_up.bfloat16(), gate_up_scale=None, down=down.bfloat16(), down_scale=None)
        (gu, gus), (d, ds) = fp8.quantize_blocks(gate_up), fp8.quantize_blocks(down)
        return dict(gate_up=gu, gate_up_scale=gus, down=d, down_scale=ds)
    stored = ctx.memo(("experts", num_experts, hidden, inter, fp8_checkpoint), build)
    return {name: None if t is None else t.clone() for name, t in stored.items()}


def v3_rope(ctx: Context, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's YaRN cos/sin at positions [B, T] -> [B, T, 32] each."""
    config = ctx.memo("v3", lambda: load_config("deepseek-v3"))
    cos, sin = ctx.memo("rope", lambda: rope_tables(config, config.max_position_embeddings, torch.device("cpu")))
    return cos[positions], sin[positions]


def v3_softmax_scale(ctx: Context) -> float:
    return ctx.memo("v3", lambda: load_config("deepseek-v3")).softmax_scale()


def tiny_checkpoint(ctx: Context) -> Path:
    """The built-in tiny checkpoint, or one written from synthetic FP8 weights of the tiny config."""
    from dsv3.api import TINY_CHECKPOINT
    if (TINY_CHECKPOINT / "config.json").exists():
        return TINY_CHECKPOINT

    def build():
        from dsv3.checkpoint import save_checkpoint
        from dsv3.weights import RandomSource
        config = load_config("tiny")
        source = RandomSource(config, fp8=True, seed=0)
        tensors = {name: source.get(name) for name in sorted(source.names())}
        return save_checkpoint(ctx.workdir / "tiny", tensors, config.to_dict())
    return ctx.memo("tiny", build)


def poison(x: torch.Tensor, row_index: tuple[int, ...], value: float, column: int = 0) -> None:
    x[row_index + (column,)] = value


# ---- op cases ------------------------------------------------------------------------------

def _linear(precision: str):
    def call(backend: Backend, inp: dict):
        weight = backend.prepare_linear(inp["weight"], inp["scale"], precision)
        return backend.linear(inp["x"], weight)
    return call


def linear_cases(plan: Plan, precision: str) -> list[Case]:
    op = "linear_fp8" if precision == "fp8" else "linear_bf16"
    dtype = ACTIVATION_DTYPES[precision]
    call = _linear(precision)

    def case(name, n, k, lead, transform=None, check="close", dense_weight=False):
        def inputs(ctx):
            g = generator(f"{op}{precision}{name}")
            if dense_weight:
                weight, scale = randn(g, n, k, scale=k ** -0.5).bfloat16(), None
            else:
                weight, scale = fp8_weight(ctx, n, k)
            inp = dict(x=randn(g, *lead, k), weight=weight, scale=scale)
            if transform:
                transform(inp, g)
            inp["x"] = inp["x"].to(dtype)
            return inp
        return Case(op, precision, name, inputs, call, check)

    def zero_block(inp, g):  # row 0: first 128-block zero; row 1: all zero (output must be exactly 0)
        inp["x"][0, :128] = 0
        inp["x"][1] = 0

    def non_finite(inp, g):
        poison(inp["x"], (1,), float("nan"), 300)
        poison(inp["x"], (2,), float("inf"), 5)
        inp["poisoned"] = torch.tensor([False, True, True, False])

    def mixed_blocks(inp, g):  # K block 0 huge, but its weight columns zero: a per-tensor scale loses the rest
        inp["x"][:, :128] *= 1e4
        w = fp8.dequantize_blocks(inp["weight"], inp["scale"], torch.float32)
        w[:, :128] = 0
        inp["weight"], inp["scale"] = fp8.quantize_blocks(w)

    def beyond_range(inp, g):
        inp["x"] *= 1e4

    def huge_dense_weight(inp, g):  # a BF16 weight with values far beyond FP8's 448, quantized at load
        inp["weight"] = (inp["weight"].float() * 3e4).bfloat16()

    cases = [case(f"{n}x{k} M={m}", n, k, (m,)) for n, k in plan.linear_shapes for m in plan.token_counts]
    first_n, first_k = plan.linear_shapes[0]
    cases += [
        case("unaligned 576x7168 (kv_a) M=3", 576, 7168, (3,)),
        case(f"input [2, 3, {first_k}] -> {first_n}", first_n, first_k, (2, 3)),
        case(f"large batch {first_n}x{first_k} M={plan.large_tokens}", first_n, first_k, (plan.large_tokens,)),
        case("zero 128-block and zero row, 576x7168", 576, 7168, (4,), zero_block),
        case("NaN and inf rows, 576x7168", 576, 7168, (4,), non_finite, "propagate"),
    ]
    if precision == "fp8":
        cases += [
            case("activations beyond FP8 range (x1e4), 576x7168", 576, 7168, (4,), beyond_range),
            case("mixed block magnitudes (1e4 and 1), 576x7168", 576, 7168, (4,), mixed_blocks),
            case("BF16 weight quantized at load, 576x7168", 576, 7168, (4,), None, dense_weight=True),
            case("BF16 weight beyond FP8 range (3e4), 576x7168", 576, 7168, (4,), huge_dense_weight,
                 dense_weight=True),
        ]
    else:
        cases.append(case("BF16 checkpoint weight, 576x7168", 576, 7168, (4,), None, dense_weight=True))
    return cases


def rms_norm_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, rows, dim, residual=False, transform=None, check="close"):
        def inputs(ctx):
            g = generator(f"rms{precision}{name}")
            inp = dict(x=randn(g, rows, dim), weight=(1 + randn(g, dim, scale=0.1)).to(dtype),
                       residual=randn(g, rows, dim) if residual else None)
            if transform:
                transform(inp)
            inp["x"] = inp["x"].to(dtype)
            if residual:
                inp["residual"] = inp["residual"].to(dtype)
            return inp
        return Case("rms_norm", precision, name, inputs,
                    lambda backend, inp: backend.rms_norm(inp["x"], inp["weight"], 1e-6, inp["residual"]), check)

    def zero_row(inp):
        inp["x"][1] = 0

    def large(inp):
        inp["x"] *= 1e4

    def non_finite(inp):
        poison(inp["x"], (1,), float("nan"))
        poison(inp["x"], (2,), float("inf"), 7)
        inp["poisoned"] = torch.tensor([False, True, True, False])

    cases = [case(f"D={d} M={m}", m, d) for d in (7168, 1536, 512) for m in plan.token_counts]
    cases += [
        case("residual D=7168 M=16", 16, 7168, residual=True),
        case("residual D=7168 M=1", 1, 7168, residual=True),
        case(f"large batch D=7168 M={plan.large_tokens}", plan.large_tokens, 7168),
        case("zero row D=7168", 4, 7168, transform=zero_row),
        case("values 1e4 D=7168", 4, 7168, transform=large),
        case("NaN and inf rows D=7168", 4, 7168, transform=non_finite, check="propagate"),
        case("NaN and inf rows, residual D=512", 4, 512, residual=True, transform=non_finite, check="propagate"),
    ]
    return cases


def rotary_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, shape, positions, check="close", poisoned_row=None):
        def inputs(ctx):
            g = generator(f"rotary{precision}{name}")
            pos = positions(g)
            cos, sin = v3_rope(ctx, pos)
            x = randn(g, *shape)
            inp = dict(x=x, cos=cos, sin=sin)
            if poisoned_row is not None:
                poison(x, poisoned_row, float("nan"), 1)
                poison(x, (shape[0] - 1,) + (0,) * (len(shape) - 2), float("inf"), 2)
                mask = torch.zeros(shape[:-1], dtype=torch.bool)
                mask[poisoned_row] = mask[(shape[0] - 1,) + (0,) * (len(shape) - 2)] = True
                inp["poisoned"] = mask
            inp["x"] = x.to(dtype)
            return inp
        return Case("rotary", precision, name, inputs,
                    lambda backend, inp: backend.rotary(inp["x"], inp["cos"], inp["sin"]), check)

    def span(b, t, start=0):
        return lambda g: (start + torch.arange(t)).expand(b, t)

    def scattered(b, high):
        return lambda g: torch.randint(0, high, (b, 1), generator=g)

    long = plan.long_seq
    return [
        case("q_pe [1, 16, 128, 64]", (1, 16, V3_HEADS, ROPE), span(1, 16)),
        case("k_pe [2, 16, 64]", (2, 16, ROPE), span(2, 16)),
        case("length 1 [1, 1, 128, 64]", (1, 1, V3_HEADS, ROPE), span(1, 1)),
        case("decode [32, 1, 128, 64] positions < 4096", (32, 1, V3_HEADS, ROPE), scattered(32, 4096)),
        case(f"long [1, {long}, 16, 64]", (1, long, LITE_HEADS, ROPE), span(1, long)),
        case("YaRN-extended positions 163800+", (2, 8, V3_HEADS, ROPE), span(2, 8, 163800)),
        case("NaN and inf rows", (2, 4, V3_HEADS, ROPE), span(2, 4), "propagate", (0, 1, 3)),
    ]


def swiglu_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, rows, inter, check="close", poisoned=()):
        def inputs(ctx):
            g = generator(f"swiglu{precision}{name}")
            fused = randn(g, rows, 2 * inter, scale=4.0)  # a gate+up GEMM's output; the op gets its halves
            for row in poisoned:
                fused[row, 1] = float("nan") if row % 2 == 0 else float("inf")
            fused = fused.to(dtype)
            inp = dict(gate=fused[:, :inter], up=fused[:, inter:])
            if poisoned:
                inp["poisoned"] = torch.zeros(rows, dtype=torch.bool)
                inp["poisoned"][list(poisoned)] = True
            return inp
        return Case("swiglu", precision, name, inputs, lambda backend, inp: backend.swiglu(inp["gate"], inp["up"]),
                    check)

    return [
        case("dense MLP, 1 token, I=18432", 1, 18432),
        case("expert I=2048, 64 tokens", 64, 2048),
        case("unaligned I=1000, 7 tokens", 7, 1000),
        case("NaN and inf rows", 4, 2048, "propagate", (0, 3)),
    ]


def _mla_weights(backend: Backend, inp: dict):
    heads = inp["heads"]
    return backend.prepare_mla(inp["kv_b"], heads, NOPE, VALUE, inp["dtype"])


def _mla_cache(backend: Backend, inp: dict, max_batch: int, max_seq: int) -> torch.Tensor:
    return backend.allocate_mla_cache(backend.mla_cache_spec(max_batch, max_seq, RANK, ROPE, inp["dtype"]))


def _attention_inputs(g: torch.Generator, batch: int, tokens: int, heads: int, dtype: torch.dtype) -> dict:
    shapes = dict(q_nope=(batch, tokens, heads, NOPE), q_pe=(batch, tokens, heads, ROPE),
                  latent=(batch, tokens, RANK), k_pe=(batch, tokens, ROPE))
    return {name: randn(g, *shape).to(dtype) for name, shape in shapes.items()}


def _prefill(backend, cache, slots, start_pos, part, weights, scale):
    return backend.mla_prefill(part["q_nope"], part["q_pe"], part["latent"], part["k_pe"], cache, slots,
                               start_pos, weights, scale)


def mla_prefill_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, batch, tokens, slots, chunks=1, nan=False):
        def inputs(ctx):
            g = generator(f"prefill{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), slots=torch.tensor(slots),
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       parts=[_attention_inputs(g, batch, tokens, heads, dtype) for _ in range(chunks)])
            if nan:
                poison(inp["parts"][0]["latent"], (0, 0), float("nan"))
                mask = torch.zeros(batch, tokens, heads, dtype=torch.bool)
                mask[0] = True  # every query of sequence 0 attends token 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            weights = _mla_weights(backend, inp)
            cache = _mla_cache(backend, inp, max(slots) + 1, tokens * chunks)
            outs = tuple(_prefill(backend, cache, inp["slots"], i * tokens, part, weights, inp["scale"])
                         for i, part in enumerate(inp["parts"]))
            return outs if len(outs) > 1 else outs[0]
        return Case("mla_prefill", precision, name, inputs, call, "propagate" if nan else "close")

    long, large = plan.long_seq, plan.large_batch
    return [
        case("length 1, batch 1", V3_HEADS, 1, 1, [0]),
        case("B=2 T=16, slots [3, 1]", V3_HEADS, 2, 16, [3, 1]),
        case("chunked: T=24 at start_pos 0 then 24", V3_HEADS, 2, 24, [0, 1], chunks=2),
        case(f"large batch B={large} T=4", V3_HEADS, large, 4, list(range(large))),
        case(f"long T={long}, 16 heads (V2-Lite)", LITE_HEADS, 1, long, [0]),
        case("NaN in sequence 0's first latent", V3_HEADS, 2, 8, [0, 1], nan=True),
    ]


def mla_decode_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, lengths, nan=False):
        def inputs(ctx):
            g = generator(f"decode{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), lengths=lengths,
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       history=[_attention_inputs(g, 1, n, heads, dtype) if n else None for n in lengths],
                       new={k: v[:, 0] for k, v in _attention_inputs(g, len(lengths), 1, heads, dtype).items()})
            if nan:
                poison(inp["new"]["q_nope"], (0, 0), float("nan"))
                mask = torch.zeros(len(lengths), heads, dtype=torch.bool)
                mask[0, 0] = True  # heads are independent: only head 0 of sequence 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            weights = _mla_weights(backend, inp)
            device = backend.device
            cache = _mla_cache(backend, inp, len(lengths), max(lengths) + 1)
            for n in sorted(set(lengths) - {0}):  # one prefill per history length, sequences batched
                slots = [i for i, length in enumerate(lengths) if length == n]
                history = {k: torch.cat([inp["history"][i][k] for i in slots]) for k in inp["history"][slots[0]]}
                for start in range(0, n, PREFILL_CHUNK):
                    chunk = {k: v[:, start:start + PREFILL_CHUNK] for k, v in history.items()}
                    _prefill(backend, cache, torch.tensor(slots, device=device), start, chunk, weights, inp["scale"])
            new = inp["new"]
            return backend.mla_decode(new["q_nope"], new["q_pe"], new["latent"], new["k_pe"], cache,
                                      torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device), weights, inp["scale"])
        return Case("mla_decode", precision, name, inputs, call, "propagate" if nan else "close")

    long, large = plan.long_seq, plan.large_batch
    return [
        case("batch 1 at position 0 (no history)", V3_HEADS, [0]),
        case("B=4 at positions [5, 17, 1, 64]", V3_HEADS, [5, 17, 1, 64]),
        case(f"large batch B={large} at positions 1, 9, 33, 64", V3_HEADS,
             [(1, 9, 33, 64)[i % 4] for i in range(large)]),
        case(f"long context {long} and {long // 2 + 3}, 16 heads", LITE_HEADS, [long, long // 2 + 3]),
        case("NaN in sequence 0's query, head 0", V3_HEADS, [3, 9], nan=True),
    ]


def moe_route_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(method, name, tokens, with_bias=True, nan=False):
        hidden, experts, config = ROUTINGS[method]

        def inputs(ctx):
            g = generator(f"route{method}{name}")
            # logits ~ N(0, 1): sigmoid scores stay off saturation, so few tokens are near-ties
            inp = dict(x=randn(g, tokens, hidden), gate_weight=randn(g, experts, hidden, scale=hidden ** -0.5),
                       bias=randn(g, experts, scale=0.1) if with_bias and method == "noaux_tc" else None,
                       config=config)
            if nan:
                poison(inp["x"], (3,), float("nan"))
                inp["poisoned"] = torch.arange(tokens) == 3
            inp["x"] = inp["x"].to(dtype)
            return inp
        return Case("moe_route", precision, f"{method}: {name}", inputs,
                    lambda backend, inp: backend.moe_route(inp["x"], inp["gate_weight"], inp["bias"], inp["config"]),
                    "route")

    cases = []
    for method in ROUTINGS:
        cases += [case(method, f"N={n}", n) for n in plan.token_counts]
        cases += [case(method, f"large batch N={plan.large_tokens}", plan.large_tokens),
                  case(method, "NaN token 3 of 8 (other tokens unaffected)", 8, nan=True)]
    cases.append(case("noaux_tc", "no correction bias N=16", 16, with_bias=False))
    return cases


def moe_experts_cases(plan: Plan, precision: str) -> list[Case]:
    """The plan's expert shape for every case; its extra shape for one case at fp8 and bf16."""
    dtype = ACTIVATION_DTYPES[precision]
    main, extra = plan.experts, plan.extra_experts

    def case(name, shape, tokens, choose=None, transform=None, check="close"):
        num_experts, hidden, inter, fp8_checkpoint, top_k = shape

        def inputs(ctx):
            g = generator(f"experts{precision}{name}{shape}")
            ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
            if choose:
                ids = choose(ids, g, num_experts, top_k)
            inp = dict(x=randn(g, tokens, hidden), ids=ids, weights=torch.rand(tokens, top_k, generator=g) + 0.1,
                       **expert_weights(ctx, num_experts, hidden, inter, fp8_checkpoint))
            if transform:
                transform(inp)
            inp["x"] = inp["x"].to(dtype)
            return inp

        def call(backend, inp):
            experts = backend.prepare_experts(inp["gate_up"], inp["gate_up_scale"], inp["down"], inp["down_scale"],
                                              precision)
            return backend.moe_experts(inp["x"], inp["weights"], inp["ids"], experts)
        label = f"{name} [{num_experts} experts D={hidden} I={inter}, top-{top_k}]"
        return Case("moe_experts", precision, label, inputs, call, check)

    def few_experts(ids, g, num_experts, top_k):  # only experts 0..top_k-1 get tokens: the rest get none
        return torch.stack([torch.randperm(top_k, generator=g) for _ in range(ids.shape[0])])

    def one_expert_everywhere(ids, g, num_experts, top_k):  # expert 2 gets every token
        rows = []
        for _ in range(ids.shape[0]):
            others = torch.randperm(num_experts - 1, generator=g)[:top_k - 1]
            rows.append(torch.cat((torch.tensor([2]), others + (others >= 2).long())))
        return torch.stack(rows)

    def zero_row(inp):
        inp["x"][1] = 0

    def beyond_range(inp):
        inp["x"] *= 1e4

    def non_finite(inp):
        poison(inp["x"], (1,), float("nan"))
        poison(inp["x"], (4,), float("inf"), 9)
        inp["poisoned"] = torch.isin(torch.arange(inp["x"].shape[0]), torch.tensor([1, 4]))

    cases = [case(f"N={n}", main, n) for n in plan.token_counts]
    cases += [
        case(f"large batch N={plan.large_tokens}", main, plan.large_tokens),
        case("experts with no tokens", main, 16, choose=few_experts),
        case(f"one expert with all {plan.large_tokens} tokens", main, plan.large_tokens, choose=one_expert_everywhere),
        case("zero token row", main, 4, transform=zero_row),
        case("NaN and inf tokens sharing an expert", main, 8, choose=one_expert_everywhere, transform=non_finite,
             check="propagate"),
    ]
    if precision == "fp8":
        cases.append(case("activations beyond FP8 range (x1e4)", main, 4, transform=beyond_range))
    if extra and precision != "fp32":
        cases.append(case("N=4", extra, 4))
    return cases


def model_cases(precision: str) -> list[Case]:
    def inputs(ctx):
        path = tiny_checkpoint(ctx)
        g = generator("model")
        vocab = load_config(path).vocab_size
        tokens = torch.randint(2, vocab, (2, 12), generator=g)
        inp = dict(path=path, tokens=tokens, prompts=[tokens[0].tolist(), tokens[1, :5].tolist()])
        if precision != "fp32":  # the exact answer, to tell a precision's own rounding noise from a wrong result
            from dsv3.api import load_model
            inp["exact"] = load_model(path, backend=ReferenceBackend(), precision="fp32", max_batch_size=2,
                                      max_seq_len=64, progress=False, quiet=True).logits(tokens)
        return inp

    def load(backend, inp):
        from dsv3.api import load_model
        return load_model(inp["path"], backend=backend, precision=precision, max_batch_size=2, max_seq_len=64,
                          progress=False, quiet=True)

    def logits(backend, inp):
        return load(backend, inp).logits(inp["tokens"])

    def greedy(backend, inp):
        model = load(backend, inp)
        return Greedy(inp["prompts"], model.generate(inp["prompts"], max_new_tokens=8), model)

    return [Case(MODEL, precision, "tiny checkpoint: logits [2, 12]", inputs, logits,
                 "close" if precision == "fp32" else "logits"),
            Case(MODEL, precision, "tiny checkpoint: greedy 8 tokens, prompts of 12 and 5", inputs, greedy, "greedy")]


def build_cases(plan: str | Plan = "quick", precisions=SUITE_PRECISIONS, ops=SUITE_OPS) -> list[Case]:
    """Every case of the suite for these precisions and ops, in matrix order."""
    plan = PLANS[plan] if isinstance(plan, str) else plan
    dense = ("bf16", "fp32")
    builders = {  # op -> (its cases at one precision, the precisions it is run at)
        "linear_fp8": (lambda p: linear_cases(plan, p), ("fp8",)),
        "linear_bf16": (lambda p: linear_cases(plan, p), dense),
        "rms_norm": (lambda p: rms_norm_cases(plan, p), dense),
        "rotary": (lambda p: rotary_cases(plan, p), dense),
        "swiglu": (lambda p: swiglu_cases(plan, p), dense),
        "mla_prefill": (lambda p: mla_prefill_cases(plan, p), dense),
        "mla_decode": (lambda p: mla_decode_cases(plan, p), dense),
        "moe_route": (lambda p: moe_route_cases(plan, p), dense),
        "moe_experts": (lambda p: moe_experts_cases(plan, p), SUITE_PRECISIONS),
        MODEL: (model_cases, SUITE_PRECISIONS),
    }
    return [case for op in SUITE_OPS if op in ops for p in SUITE_PRECISIONS if p in precisions
            if p in builders[op][1] for case in builders[op][0](p)]


# ---- checks --------------------------------------------------------------------------------

class Mismatch(Exception):
    """An output of the wrong shape or dtype (reported as the failure)."""


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def _same_layout(got: torch.Tensor, expected: torch.Tensor) -> None:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"returned {type(got).__name__}, expected a tensor")
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise Mismatch(f"returned {got.dtype} {list(got.shape)}, expected {expected.dtype} {list(expected.shape)}")


def row_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max over rows of max|got - expected| / max|expected| in the row (non-finite got counts as inf)."""
    g, e = _rows(got).to(expected.device), _rows(expected)
    if e.numel() == 0:
        return 0.0
    diff = torch.where(torch.isfinite(g), (g - e).abs(), torch.full_like(g, float("inf")))
    floor = max(e.abs().max().item() * 1e-6, 1e-30)
    return (diff.amax(-1) / e.abs().amax(-1).clamp_min(floor)).max().item()


def check_close(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    got, expected = _tuple(got), _tuple(expected)
    if len(got) != len(expected):
        raise Mismatch(f"returned {len(got)} outputs, expected {len(expected)}")
    for e in expected:
        if not torch.isfinite(e.float()).all():
            return False, None, "suite error: the reference output is not finite"
    for g, e in zip(got, expected):
        _same_layout(g, e)
    error = max(row_error(g, e) for g, e in zip(got, expected))
    return error <= tol.error, error, ""


def check_logits(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    """Model logits at a rounding precision: within the tolerance of the reference at that precision, or,
    where the model amplifies rounding (expert choices flip on near-ties), no farther from the exact
    fp32 logits than the reference itself is (x1.25 + the tolerance). A wrong result fails both."""
    ok, error, _ = check_close(got, expected, inp, tol)
    if ok:
        return ok, error, ""
    own, ours = row_error(expected, inp["exact"]), row_error(got, inp["exact"])
    note = f"reference is {own:.1e} from exact fp32, backend {ours:.1e}"
    return ours <= 1.25 * own + tol.error, error, note


def check_propagate(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    got, expected = _tuple(got), _tuple(expected)
    if len(got) != len(expected):
        raise Mismatch(f"returned {len(got)} outputs, expected {len(expected)}")
    poisoned = inp["poisoned"].reshape(-1).to(expected[0].device)
    error = 0.0
    for g, e in zip(got, expected):
        _same_layout(g, e)
        er, gr = _rows(e), _rows(g)
        if not torch.equal(~torch.isfinite(er).all(-1), poisoned):
            return False, None, "suite error: the reference does not propagate exactly to the poisoned rows"
        bad = ~torch.isfinite(gr).all(-1)
        if (poisoned & ~bad).any():
            swallowed = int((poisoned & ~bad).sum())
            return False, None, f"{swallowed} of {int(poisoned.sum())} rows fed a NaN/inf came out finite"
        if (bad & ~poisoned).any():
            return False, None, f"{int((bad & ~poisoned).sum())} rows not fed a NaN/inf came out non-finite"
        error = max(error, row_error(gr[~poisoned], er[~poisoned]))
    return error <= tol.error, error, f"{int(poisoned.sum())} poisoned rows non-finite, the other rows finite"


def routing_margins(logits: torch.Tensor, bias: torch.Tensor | None, config: RoutingConfig) -> torch.Tensor:
    """Per token [N], how far the reference's choice is from a tie, relative to the scores involved:
    the gap between the last kept and the first dropped group, and between the k-th and (k+1)-th expert."""
    scores = logits.sigmoid() if config.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    margin = torch.full(choice.shape[:1], float("inf"), device=choice.device)
    if config.method in ("noaux_tc", "group_limited_greedy") and config.num_groups > 1:
        grouped = choice.view(choice.shape[0], config.num_groups, -1)
        group_scores = grouped.topk(2, -1).values.sum(-1) if config.method == "noaux_tc" else grouped.amax(-1)
        if config.topk_groups < config.num_groups:
            top = group_scores.topk(config.topk_groups + 1, -1).values
            margin = (top[:, -2] - top[:, -1]) / top[:, -2].abs().clamp_min(1e-30)
        kept = group_scores.topk(config.topk_groups, -1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)
    k = config.top_k
    if k < choice.shape[1]:
        top = choice.topk(k + 1, -1).values
        margin = torch.minimum(margin, (top[:, k - 1] - top[:, k]) / top[:, k - 1].abs().clamp_min(1e-30))
    return margin


def check_route(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    (weights, ids), (ref_weights, ref_ids) = _tuple(got), _tuple(expected)
    _same_layout(weights, ref_weights)
    _same_layout(ids, ref_ids)
    num_experts = inp["gate_weight"].shape[0]
    if ((ids < 0) | (ids >= num_experts)).any():
        return False, None, f"expert ids outside [0, {num_experts})"
    ids_sorted, order = ids.sort(-1)
    if (ids_sorted[:, 1:] == ids_sorted[:, :-1]).any():
        return False, None, "a token picked the same expert twice"
    ref_sorted, ref_order = ref_ids.sort(-1)
    clean = ~inp["poisoned"].to(ids.device) if "poisoned" in inp else torch.ones(len(ids), dtype=torch.bool,
                                                                                 device=ids.device)
    logits = torch.nn.functional.linear(inp["x"].float(), inp["gate_weight"].float())
    decided = clean & (routing_margins(logits, inp["bias"], inp["config"]) > tol.tie)
    same = (ids_sorted == ref_sorted).all(-1)
    wrong = decided & ~same
    if wrong.any():
        t = int(wrong.nonzero()[0])
        return False, None, (f"{int(wrong.sum())} of {int(decided.sum())} tokens picked other experts "
                             f"(token {t}: {ids_sorted[t].tolist()}, reference {ref_sorted[t].tolist()})")
    compared = clean & same
    error = row_error(weights.gather(1, order)[compared], ref_weights.gather(1, ref_order)[compared])
    ties = int((clean & ~decided).sum())
    return error <= tol.error, error, f"{ties} near-tie tokens not compared" if ties else ""


def check_greedy(got: Greedy, expected: Greedy, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    notes = []
    for i, (prompt, tokens, ref_tokens) in enumerate(zip(expected.prompts, got.tokens, expected.tokens)):
        if tokens == ref_tokens:
            continue
        shared = min(len(tokens), len(ref_tokens))
        step = next((j for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), shared)
        if step >= shared:
            return False, None, f"prompt {i}: {len(tokens)} tokens generated, reference {len(ref_tokens)}"
        logits = expected.model.logits(torch.tensor([prompt + ref_tokens[:step]]))[0, -1]
        margin = ((logits[ref_tokens[step]] - logits[tokens[step]]) / logits.abs().max()).item()
        if margin > tol.error:
            return False, margin, (f"prompt {i}: token {step} is {tokens[step]}, reference {ref_tokens[step]} "
                                   f"(reference logit margin {margin:.1e}, not a near-tie)")
        notes.append(f"prompt {i} diverged at token {step} on a near-tie ({margin:.1e})")
    return True, 0.0, "; ".join(notes) or "same tokens"


CHECKS = {"close": check_close, "logits": check_logits, "propagate": check_propagate, "route": check_route,
          "greedy": check_greedy}


# ---- running ---------------------------------------------------------------------------------

def reference_for(backend: Backend) -> ReferenceBackend:
    """The reference backend on the tested backend's device, with its FP8 format, max and scale rounding."""
    caps = backend.capabilities
    formats = {dtype: name for name, dtype in fp8.FP8_FORMATS.items()}
    fmt = formats.get(caps.fp8_dtype, "e4m3fn")
    fp8_max = caps.fp8_max if caps.fp8_dtype in formats else None
    return ReferenceBackend(device=caps.device, fp8_format=fmt, fp8_max=fp8_max, ue8m0=getattr(backend, "ue8m0", False))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def supported(backend: Backend, case: Case) -> str | None:
    """None if the backend runs this case, else the reason it is skipped."""
    caps = backend.capabilities
    if case.precision == "fp8" and not caps.has_fp8:
        return f"{caps.name} on {caps.device} has no FP8 (runs FP8 checkpoints in BF16)"
    if case.op != MODEL and not backend.supports(case.op, case.precision):
        return f"{caps.name} does not implement {case.op} at {case.precision}"
    if case.precision == "fp8" and caps.fp8_dtype not in fp8.FP8_FORMATS.values():
        return f"no reference for FP8 dtype {caps.fp8_dtype}"
    return None


def run_case(case: Case, backend: Backend, reference: Backend, ctx: Context) -> Result:
    """Run one case on the reference and on the backend, and check it."""
    tol = TOLERANCES[case.op][case.precision]
    result = Result(case.op, case.precision, case.name, SKIPPED, tolerance=tol.error)
    why = supported(backend, case)
    if why:
        result.detail = why
        return result
    start = time.perf_counter()
    result.status = FAIL
    with torch.inference_mode():
        try:
            inp = _to_device(case.inputs(ctx), backend.device)
            expected = case.call(reference, inp)
        except Exception as e:  # the suite or the reference is wrong: a failure of the row, never a pass
            result.detail = f"suite error: reference raised {_one_line(e)}"
            return result
        try:
            got = case.call(backend, inp)
            backend.synchronize()
        except (ValueError, Dsv3Error) as e:
            if "poisoned" not in inp:
                result.detail = f"raised {_one_line(e)}"
                return result
            result.status, result.detail = PASS, f"rejected the non-finite input: {_one_line(e)}"
            got = None
        except Exception as e:
            result.detail = f"raised {_one_line(e)}"
            return result
        if got is not None:
            try:
                ok, result.error, result.detail = CHECKS[case.check](got, expected, inp, tol)
            except Mismatch as e:
                ok, result.detail = False, str(e)
            result.status = PASS if ok else FAIL
    result.seconds = time.perf_counter() - start
    if result.status == PASS and getattr(backend, "emulation", None):
        result.status = EMULATED
    return result


def device_name(device: str) -> str:
    """A readable name of the device, asked through torch's device-generic module (no vendor import)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        except OSError:
            names = []
        return names[0] if names else platform.processor() or platform.machine() or "CPU"
    module = torch.get_device_module(dev.type)
    try:
        return module.get_device_name(dev.index or 0)
    except Exception as e:  # a device module without names: say so rather than fail the run
        return f"{dev.type} ({_one_line(e)})"


def run_conformance(backend: Backend | None, plan: str = "quick", precisions=SUITE_PRECISIONS, ops=SUITE_OPS,
                    requested: str = "auto", reason: str = "", on_result: Callable[[Result], None] | None = None
                    ) -> Report:
    """Run the suite on a backend against the reference backend on its device.

    Args:
        backend: the backend to test, or None where it could not be built (every row is then
            skipped with `reason`, never passed).
        plan: "quick" or "full" (see PLANS).
        precisions, ops: the subset to run.
        requested: the backend name asked for ("auto" or a name), recorded in the report.
        reason: why this backend was chosen, or why it could not be built.
        on_result: called with each Result as it is ready (progress output).
    Returns:
        A Report; its exit_code is 1 if any case failed.
    """
    from dsv3.precision import resolve_precision

    cases = build_cases(plan, precisions, ops)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if backend is None:
        report = Report(backend=requested, requested=requested, reason=reason, device="-", device_name="-",
                        emulation=None, fp8_format=None, fp8_max=None, precision=None, plan=plan, date=today,
                        torch_version=torch.__version__, built=False)
        for case in cases:
            report.results.append(Result(case.op, case.precision, case.name, SKIPPED,
                                         tolerance=TOLERANCES[case.op][case.precision].error, detail=reason))
            if on_result:
                on_result(report.results[-1])
        return report
    caps = backend.capabilities
    report = Report(backend=caps.name, requested=requested, reason=reason, device=caps.device,
                    device_name=device_name(caps.device), emulation=getattr(backend, "emulation", None),
                    fp8_format=str(caps.fp8_dtype).removeprefix("torch.float8_") if caps.fp8_dtype else None,
                    fp8_max=caps.fp8_max, precision=resolve_precision("auto", caps, True)[0], plan=plan, date=today,
                    torch_version=torch.__version__)
    report.results = run_cases(backend, cases, on_result)
    return report


def run_cases(backend: Backend, cases: list[Case], on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run cases on a backend against the reference backend built for it; one Result per case."""
    reference = reference_for(backend)
    results = []
    with tempfile.TemporaryDirectory(prefix="dsv3-conformance-") as workdir:
        ctx = Context(Path(workdir))
        for case in cases:
            results.append(run_case(case, backend, reference, ctx))
            if on_result:
                on_result(results[-1])
    return results
