"""Running the conformance suite: build_cases (every case of a plan, in matrix order), run_case
(one case on the reference and on the backend, checked), run_cases and run_conformance (the Report).
"""

from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from dsv3.backends import fp8
from dsv3.backends.interface import Backend
from dsv3.backends.reference import ReferenceBackend
from dsv3.conformance.cases import (
    Context,
    linear_cases,
    model_cases,
    rms_norm_cases,
    rotary_cases,
    swiglu_cases,
)
from dsv3.conformance.checks import CHECKS, Mismatch
from dsv3.conformance.mla_moe_cases import mla_decode_cases, mla_prefill_cases, moe_experts_cases, moe_route_cases
from dsv3.conformance.suite import (
    EMULATED,
    FAIL,
    MODEL,
    PASS,
    PLANS,
    SKIPPED,
    SUITE_OPS,
    SUITE_PRECISIONS,
    Case,
    Plan,
    Report,
    Result,
)
from dsv3.errors import Dsv3Error


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


def reference_for(backend: Backend) -> ReferenceBackend:
    """The reference backend on the tested backend's device, with its FP8 format, max and scale rounding."""
    caps = backend.capabilities
    formats = {dtype: name for name, dtype in fp8.FP8_FORMATS.items()}
    fmt = formats.get(caps.fp8_dtype, "e4m3fn")
    fp8_max = caps.fp8_max if caps.fp8_dtype in formats else None
    return ReferenceBackend(device=caps.device, fp8_format=fmt, fp8_max=fp8_max, ue8m0=backend.ue8m0)


def one_line(e: BaseException) -> str:
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
    tol = case.allowed
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
            result.detail = f"suite error: reference raised {one_line(e)}"
            return result
        try:
            got = case.call(backend, inp)
            backend.synchronize()
        except (ValueError, Dsv3Error) as e:
            if "poisoned" not in inp:
                result.detail = f"raised {one_line(e)}"
                return result
            result.status, result.detail = PASS, f"rejected the non-finite input: {one_line(e)}"
            got = None
        except Exception as e:
            result.detail = f"raised {one_line(e)}"
            return result
        if got is not None:
            try:
                ok, result.error, result.detail = CHECKS[case.check](got, expected, inp, tol)
            except Mismatch as e:
                ok, result.detail = False, str(e)
            result.status = PASS if ok else FAIL
    result.seconds = time.perf_counter() - start
    if result.status == PASS and backend.emulation:
        result.status = EMULATED
    return result


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
                                         tolerance=case.allowed.error, detail=reason))
            if on_result:
                on_result(report.results[-1])
        return report
    caps = backend.capabilities
    report = Report(backend=caps.name, requested=requested, reason=reason, device=caps.device,
                    device_name=backend.device_name(), emulation=backend.emulation,
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
