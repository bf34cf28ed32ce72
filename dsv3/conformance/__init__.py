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

This package imports no vendor module; the tested backend comes in as a Backend object. Its modules:

- suite: statuses, Tolerance and TOLERANCES, Plan and PLANS, Case, Result, Report;
- cases: the case inputs (Context, seeds, shared weights) and the linear, norm, rotary, SwiGLU and model cases;
- mla_moe_cases: the MLA prefill/decode and MoE routing/experts cases;
- checks: how an output is compared with the reference (row_error, routing margins, CHECKS);
- runner: build_cases, run_case, run_cases and run_conformance.
"""

from dsv3.conformance.cases import (  # noqa: F401
    Context,
    expert_weights,
    fp8_weight,
    generator,
    linear_cases,
    model_cases,
    poison,
    randn,
    rms_norm_cases,
    rotary_cases,
    swiglu_cases,
    tiny_checkpoint,
    v3_rope,
    v3_softmax_scale,
)
from dsv3.conformance.checks import (  # noqa: F401
    CHECKS,
    Mismatch,
    check_close,
    check_greedy,
    check_logits,
    check_propagate,
    check_route,
    routing_margins,
    row_error,
)
from dsv3.conformance.mla_moe_cases import (  # noqa: F401
    mla_decode_cases,
    mla_prefill_cases,
    moe_experts_cases,
    moe_route_cases,
)
from dsv3.conformance.runner import (  # noqa: F401
    _one_line,
    build_cases,
    device_name,
    reference_for,
    run_case,
    run_cases,
    run_conformance,
    supported,
)
from dsv3.conformance.suite import (  # noqa: F401
    EMULATED,
    FAIL,
    LITE_EXPERTS,
    LITE_HEADS,
    MODEL,
    NOPE,
    PASS,
    PLANS,
    PREFILL_CHUNK,
    RANK,
    ROPE,
    ROUTINGS,
    SKIPPED,
    SUITE_OPS,
    SUITE_PRECISIONS,
    TOLERANCES,
    V3_EXPERTS,
    V3_HEADS,
    V3_LINEAR_SHAPES,
    VALUE,
    Case,
    Greedy,
    Plan,
    Report,
    Result,
    Tolerance,
)
