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

The package exports what `dsv3 conformance` uses; tests and tools import the modules.
"""

from dsv3.conformance.runner import build_cases, one_line, run_conformance
from dsv3.conformance.suite import (
    EMULATED,
    FAIL,
    PASS,
    SKIPPED,
    SUITE_OPS,
    SUITE_PRECISIONS,
    TOLERANCES,
    Report,
    Result,
)

__all__ = ["EMULATED", "FAIL", "PASS", "SKIPPED", "SUITE_OPS", "SUITE_PRECISIONS", "TOLERANCES", "Report", "Result",
           "build_cases", "one_line", "run_conformance"]
