"""What the conformance suite is made of: the statuses, the tolerance table (TOLERANCES), the plans
(PLANS: case sizes), the DeepSeek routings and MLA dims the cases use, and Case, Result, Report, Greedy.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from dsv3.backends.interface import OPS, Backend, RoutingConfig

if TYPE_CHECKING:
    from dsv3.conformance.cases import Context

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

#: MLA over the FP8 latent cache: a BF16 kernel dequantizes each cached latent to the BF16 its dots run in,
#: where the reference's exact emulation keeps fp32, so every cached value takes one more BF16 rounding
FP8_CACHE_TOLERANCES: dict[str, Tolerance] = {"bf16": Tolerance(3e-2), "fp32": Tolerance(2e-3)}


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
        tolerance: this case's own, where the op's row of TOLERANCES does not fit it.
    """

    op: str
    precision: str
    name: str
    inputs: Callable[["Context"], dict]
    call: Callable[[Backend, dict], Any]
    check: str = "close"
    tolerance: Tolerance | None = None  # None: TOLERANCES[op][precision]

    @property
    def allowed(self) -> Tolerance:
        return self.tolerance or TOLERANCES[self.op][self.precision]


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
