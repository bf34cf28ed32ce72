"""Merge `dsv3 conformance --json` files into one markdown matrix, checked against ci/matrix.yaml.

    python ci/merge_matrix.py out/*.json > matrix.md
    python ci/merge_matrix.py --list-rows            # the rows as JSON, for the workflow's job matrix

A file belongs to the matrix.yaml row named like the file (out/h100.json -> row h100); files of
other names are listed after the expected rows, unchecked. A row is checked against its `expect`:
the backend that ran, the precision auto picks for an FP8 checkpoint, the FP8 format, emulation,
and whether the backend could be built at all.

Exit codes: 0 every result passed (or was skipped) and matched its row; 1 a case failed or a
result does not match its row; 2 an unreadable file or bad arguments. Rows with no file are shown
as "no result" and do not change the exit code (a missing CI job fails on its own).

Needs only the standard library and PyYAML, so it runs without dsv3 installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

MATRIX = Path(__file__).resolve().parent / "matrix.yaml"
STATUSES = ("pass", "emulated", "fail", "skipped")


class InputError(Exception):
    """An unreadable or malformed input file."""


def load_rows(path: Path = MATRIX) -> list[dict]:
    try:
        rows = yaml.safe_load(path.read_text())["rows"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a matrix file with a 'rows' list ({e})") from e
    for row in rows:
        for key in ("id", "hardware", "runner", "expect"):
            if key not in row:
                raise InputError(f"{path}: row {row.get('id', '?')} has no {key!r}")
    return rows


def load_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e})") from e
    missing = [k for k in ("backend", "device", "date", "torch", "rows") if k not in result]
    if missing:
        raise InputError(f"{path}: not a `dsv3 conformance --json` report (no {missing[0]!r})")
    return result


def problems(result: dict, expect: dict | None) -> list[str]:
    """How a result differs from its row's expectation (None: a file of no row, unchecked), plus its failures."""
    found = []
    failed = sum(r["status"] == "fail" for r in result["rows"])
    if expect is None:
        return [f"{failed} failed"] if failed else []
    if not result.get("built", True):
        found.append(f"backend not built: {result.get('reason', '?')}")
    for key, label in (("backend", "backend"), ("precision", "precision"), ("fp8_format", "FP8 format")):
        if key in expect and result.get(key) != expect[key]:
            found.append(f"{label} {result.get(key)}, expected {expect[key]}")
    if not expect.get("emulated", False) and result.get("emulation"):
        found.append(f"emulated ({result['emulation']}) on a hardware row")
    if failed:
        found.append(f"{failed} failed")
    return found


def op_cell(rows: list[dict]) -> str:
    """One op at one precision on one hardware row: e.g. "pass 12/12", "FAIL 2/12", "skipped"."""
    count = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    total = len(rows)
    if count["fail"]:
        return f"**FAIL {count['fail']}/{total}**"
    if count["skipped"] == total:
        return "skipped"
    status = "emulated" if count["emulated"] else "pass"
    text = f"{status} {count['pass'] + count['emulated']}/{total}"
    return text + (f" ({count['skipped']} skipped)" if count["skipped"] else "")


def _error(value) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else str(value)


def merge(results: dict[str, dict], rows: list[dict]) -> tuple[str, int]:
    """Markdown for the results (row id -> report), and the exit code."""
    expected = {row["id"]: row for row in rows}
    order = [row["id"] for row in rows] + [name for name in results if name not in expected]
    lines = ["# dsv3 conformance matrix", "",
             "| row | hardware | device | backend | precision | FP8 | emulation | date | torch | pass | emulated "
             "| fail | skipped | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bad = False
    for name in order:
        row, result = expected.get(name), results.get(name)
        hardware = row["hardware"] if row else "(not in matrix.yaml)"
        if result is None:
            e = row["expect"]
            lines.append(f"| {name} | {hardware} | - | ({e['backend']}) | ({e['precision']}) | "
                         f"({e.get('fp8_format') or 'none'}) | - | - | - | - | - | - | - | no result |")
            continue
        found = problems(result, row["expect"] if row else None)
        bad = bad or bool(found)
        counts = {s: sum(r["status"] == s for r in result["rows"]) for s in STATUSES}
        check = "; ".join(found) if found else ("ok" if row else "unchecked")
        lines.append(f"| {name} | {hardware} | {result.get('device_name') or result['device']} | {result['backend']} "
                     f"| {result.get('precision') or '-'} | {result.get('fp8_format') or 'none'} "
                     f"| {result.get('emulation') or 'no'} | {result['date']} | {result['torch']} | {counts['pass']} "
                     f"| {counts['emulated']} | {counts['fail']} | {counts['skipped']} | {check} |")

    ran = [name for name in order if name in results]
    ops: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for name in ran:
        for r in results[name]["rows"]:
            ops.setdefault((r["op"], r["precision"]), {}).setdefault(name, []).append(r)
    if ops:
        lines += ["", "## Ops", "", "| op | precision | " + " | ".join(ran) + " |",
                  "|---|---|" + "---|" * len(ran)]
        for (op, precision), per_row in ops.items():
            cells = [op_cell(per_row[name]) if name in per_row else "-" for name in ran]
            lines.append(f"| {op} | {precision} | " + " | ".join(cells) + " |")

    failures = [(name, r) for name in ran for r in results[name]["rows"] if r["status"] == "fail"]
    if failures:
        lines += ["", "## Failures", ""]
        for name, r in failures:
            measured = f"error {_error(r['error'])} > {_error(r['tolerance'])}" if r.get("error") is not None else ""
            lines.append(f"- {name}: {r['op']} {r['precision']} [{r['case']}]: "
                         + "; ".join(x for x in (measured, r.get("detail", "")) if x))
    return "\n".join(lines) + "\n", 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge `dsv3 conformance --json` files into one markdown matrix.")
    parser.add_argument("files", nargs="*", type=Path, help="JSON reports, named <row id>.json")
    parser.add_argument("--matrix", type=Path, default=MATRIX, help="the rows and their expectations")
    parser.add_argument("--list-rows", action="store_true", help="print the rows as JSON (the workflow's job matrix)")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.matrix)
        if args.list_rows:
            print(json.dumps(rows))
            return 0
        if not args.files:
            parser.error("give the JSON files to merge (or --list-rows)")
        results = {}
        for path in args.files:
            name = path.stem
            if name in results:
                raise InputError(f"{path}: a second report for row {name}")
            results[name] = load_result(path)
    except InputError as e:
        print(f"merge_matrix: error: {e}", file=sys.stderr)
        return 2
    markdown, code = merge(results, rows)
    sys.stdout.write(markdown)
    return code


if __name__ == "__main__":
    sys.exit(main())
