"""`dsv3 conformance`: run every backend op against the reference backend and print the matrix.

Exit codes: 0 when no case failed and at least one was checked (passed or emulated); 1 when any
case failed; 2 for a usage error (an unknown backend, a bad option or device); 5 when nothing was
checked (every case skipped: the backend cannot be built here), as pytest exits when it ran no test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from dsv3 import conformance
from dsv3.checks import check_device
from dsv3.conformance import FAIL, SKIPPED, SUITE_OPS, SUITE_PRECISIONS, TOLERANCES, Report, Result
from dsv3.errors import Dsv3Error, UsageError

CELL = {conformance.PASS: "pass", conformance.EMULATED: "emulated", FAIL: "FAIL", SKIPPED: "skipped"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="auto (default: the one this machine would run; DSV3_BACKEND "
                   "overrides), reference, cuda, rocm or ascend")
    p.add_argument("--device", help="torch device for the backend (default: the backend's)")
    p.add_argument("--precision", nargs="+", choices=SUITE_PRECISIONS, default=list(SUITE_PRECISIONS),
                   metavar="PRECISION", help="fp8, bf16 and/or fp32 (default: all three)")
    p.add_argument("--op", nargs="+", choices=SUITE_OPS, default=list(SUITE_OPS), dest="ops", metavar="OP",
                   help=f"ops to run (default: all): {', '.join(SUITE_OPS)} ('model': the tiny checkpoint)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="plan",
                      help="2 linear shapes, V2-Lite-sized experts, shorter sequences: about 30 s on a 2-core CPU")
    size.add_argument("--full", action="store_const", const="full", dest="plan",
                      help="every DeepSeek-V3 GEMM shape, V3 experts, 4096-token sequences (the default)")
    p.set_defaults(plan="full")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (device, backend, date, torch, rows)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def build_backend(name: str, device: str | None):
    """(backend, reason), or (None, why it cannot be built here); an unknown name is a usage error."""
    from dsv3.backends.registry import BACKENDS
    from dsv3.backends.select import select

    if name != "auto" and name not in BACKENDS:
        raise Dsv3Error(f"--backend: unknown backend {name!r}; choose auto or one of {', '.join(sorted(BACKENDS))}")
    try:
        backend, decision = select(name, device)
        return backend, decision.reason
    except Exception as e:  # missing packages, no device, a driver error: every row is skipped with this reason
        return None, f"cannot build backend {name}: {conformance.one_line(e)}"


#: exit code of a run in which every case was skipped (pytest's "no tests ran")
NOTHING_CHECKED = 5


def run(args: argparse.Namespace) -> int:
    check_device(args.device, "--device")
    if args.json:
        check_output_file(Path(args.json), "--json")
    backend, reason = build_backend(args.backend, args.device)
    cases = conformance.build_cases(args.plan, args.precision, args.ops)
    done = [0]

    def progress(result: Result) -> None:
        done[0] += 1
        if not args.quiet:
            print(f"dsv3: [{done[0]}/{len(cases)}] {result.op} {result.precision} {result.case}: "
                  f"{CELL[result.status]} ({result.seconds:.1f}s)", file=sys.stderr, flush=True)

    report = conformance.run_conformance(backend, args.plan, args.precision, args.ops, requested=args.backend,
                                         reason=reason, on_result=progress)
    code = exit_code(report)
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if code == NOTHING_CHECKED:
        print(f"dsv3: error: nothing was checked: all {len(report.results)} cases skipped "
              f"({report.reason or 'see the skip reasons above'})", file=sys.stderr)
    return code


def exit_code(report: Report) -> int:
    """The report's exit code (1 on any failure), or NOTHING_CHECKED when no case ran."""
    if report.exit_code == 0 and not (report.count(conformance.PASS) or report.count(conformance.EMULATED)):
        return NOTHING_CHECKED
    return report.exit_code


def check_output_file(path: Path, option: str) -> None:
    """An output file that can be written: not a directory, its parent a directory (made if missing)."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: cannot create it ({parent} is not a writable directory)")


def _cell(result: Result | None) -> str:
    """E.g. "pass 3.1e-03", "FAIL 4.2e-01", "FAIL" (no error measured), "skipped", "-" (no such case)."""
    if result is None:
        return "-"
    if result.error is None or result.status == SKIPPED:
        return CELL[result.status]
    return f"{CELL[result.status]} {result.error:.1e}"


def format_report(report: Report) -> str:
    """The header, the op x case matrix (a column per precision), failures, skip reasons, tolerances."""
    lines = [f"dsv3 conformance: backend {report.backend} on {report.device} ({report.device_name}), "
             f"plan {report.plan}, {report.date}",
             f"  chosen: {report.reason}",
             f"  emulation: {report.emulation or 'none (runs on the device itself)'}",
             f"  FP8: {report.fp8_format or 'none'}"
             + (f", max {report.fp8_max:g}" if report.fp8_max else "")
             + f"; precision auto picks {report.precision or '-'} for an FP8 checkpoint; torch {report.torch_version}",
             ""]
    cells: dict[tuple[str, str], dict[str, Result]] = {}
    for r in report.results:
        cells.setdefault((r.op, r.case), {})[r.precision] = r
    width = max([len(case) for _, case in cells] + [4])
    lines.append(f"{'op':12} {'case':{width}}  " + "  ".join(f"{p:16}" for p in SUITE_PRECISIONS).rstrip())
    for (op, case), row in cells.items():
        cells_text = "  ".join(f"{_cell(row.get(p)):16}" for p in SUITE_PRECISIONS)
        lines.append(f"{op:12} {case:{width}}  {cells_text}".rstrip())

    failures = [r for r in report.results if r.status == FAIL]
    if failures:
        lines += ["", "failures:"]
        for r in failures:
            measured = f"error {r.error:.2e} > tolerance {r.tolerance:.1e}" if r.error is not None else ""
            lines.append(f"  {r.op} {r.precision} [{r.case}]: " + "; ".join(x for x in (measured, r.detail) if x))
    skipped = Counter(r.detail for r in report.results if r.status == SKIPPED)
    if skipped:
        lines += ["", "skipped:"] + [f"  {n} cases: {why}" for why, n in skipped.items()]
    lines += ["", format_tolerances(), ""]
    counts = ", ".join(f"{report.count(s)} {CELL[s] if s != FAIL else 'failed'}"
                       for s in (conformance.PASS, conformance.EMULATED, FAIL, SKIPPED))
    lines.append(f"summary: {counts} -> exit {exit_code(report)}")
    return "\n".join(lines)


def format_tolerances() -> str:
    """The tolerance table: max error per output row relative to the reference row's largest |value|."""
    lines = ["tolerances (max |backend - reference| per output row / max |reference| in that row):",
             (f"  {'op':12} " + " ".join(f"{p:22}" for p in SUITE_PRECISIONS)).rstrip()]
    for op, row in TOLERANCES.items():
        def text(p, row=row):
            t = row.get(p)
            if t is None:
                return "-"
            return f"{t.error:.1e}" + (f" (ties {t.tie:.0e})" if t.tie else "")
        lines.append((f"  {op:12} " + " ".join(f"{text(p):22}" for p in SUITE_PRECISIONS)).rstrip())
    return "\n".join(lines)
