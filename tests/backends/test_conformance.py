"""Tests of the conformance runner (`dsv3 conformance`) and of ci/merge_matrix.py.

Wrong backends (tests/conformance_doubles.py) must be reported as failures with their error, a
backend that cannot be built as skipped with the reason (never a pass), and the reference backend
must pass its own suite. The per-backend rows at the end carry the pytest markers of their backend
(`pytest -m reference` runs the reference row, `pytest -m cuda` the CUDA row, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import conformance_doubles as doubles
import pytest
import torch
from dsv3.backends.platforms import describe_chip
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.registry import BACKENDS

from dsv3.cli import main
from dsv3.conformance import EMULATED, FAIL, PASS, SKIPPED, SUITE_OPS, TOLERANCES, build_cases, run_conformance
from dsv3.conformance.checks import CHECKS
from dsv3.conformance.runner import run_cases
from dsv3.conformance.suite import Greedy, Plan

ROOT = Path(__file__).resolve().parents[2]
#: The suite's structure (every op, precision and case kind) at sizes a 2-core CPU runs in seconds;
#: the experts are smaller than any DeepSeek's because the reference's FP8 emulation is slow on a CPU.
TEST_PLAN = Plan("test", linear_shapes=((576, 7168),), token_counts=(1, 4), large_tokens=32, large_batch=4,
                 long_seq=64, experts=(4, 1024, 256, True, 2), extra_experts=None)


def run(backend, ops, precisions=("fp32",)):
    return run_conformance(backend, TEST_PLAN, precisions, ops)


def run_some(backend, op, precision, *names):
    """The cases of `op` at `precision` whose names start with one of `names` (the slow FP8 ones, a few)."""
    cases = [c for c in build_cases(TEST_PLAN, (precision,), (op,)) if c.name.startswith(names)]
    assert len(cases) >= len(names)
    return run_cases(backend, cases)


def by_status(report, status):
    results = report if isinstance(report, list) else report.results
    return [r for r in results if r.status == status]


def register(monkeypatch, name, cls_name):
    monkeypatch.setitem(BACKENDS, name, ("conformance_doubles", cls_name, None))


# ---- wrong backends fail, with their error ---------------------------------------------------------

def test_wrong_rms_norm_fails_every_row_with_its_error():
    report = run(doubles.WrongRmsNormBackend(), ("rms_norm",))
    assert report.results and report.exit_code == 1
    for r in report.results:
        assert r.status == FAIL, r
        assert r.error > TOLERANCES["rms_norm"]["fp32"].error, r


def test_fp8_scale_off_by_two_fails_fp8_linears_only():
    backend = doubles.DoubledScaleBackend()
    fp8_rows = run_some(backend, "linear_fp8", "fp8", "576x7168 M=", "zero 128-block", "NaN and inf")
    assert all(r.status == FAIL for r in fp8_rows)
    plain = [r for r in fp8_rows if r.case.startswith("576x7168 M=")]
    assert plain and all(0.9 < r.error < 1.1 for r in plain)   # y = 2 x reference: the error is 1
    dense_rows = run_some(backend, "linear_bf16", "bf16", "576x7168 M=", "BF16 checkpoint")
    assert all(r.status == PASS for r in dense_rows)


def test_missing_scale_floor_fails_on_the_zero_block():
    results = run_some(doubles.NoScaleFloorBackend(), "linear_fp8", "fp8", "576x7168 M=4", "zero 128-block",
                       "NaN and inf", "mixed block")
    failed = by_status(results, FAIL)
    assert [r.case for r in failed] == ["zero 128-block and zero row, 576x7168"]
    assert math.isinf(failed[0].error)
    assert len(by_status(results, PASS)) == len(results) - 1


def test_swallowed_nan_fails_the_propagation_rows():
    report = run(doubles.NanSwallowingBackend(), ("rms_norm",))
    failed = by_status(report, FAIL)
    assert {r.case for r in failed} == {"NaN and inf rows D=7168", "NaN and inf rows, residual D=512"}
    assert all("fed a NaN/inf came out finite" in r.detail for r in failed)
    assert len(by_status(report, PASS)) == len(report.results) - 2


def test_nan_leaking_to_other_tokens_fails():
    results = run_some(doubles.LeakyExpertsBackend(), "moe_experts", "fp32", "N=4", "NaN and inf")
    assert [r.status for r in results] == [PASS, FAIL]
    assert "not fed a NaN/inf came out non-finite" in results[1].detail


def test_experts_that_run_skipped_pairs_fail_the_skip_cases():
    results = run_some(doubles.UnskippedExpertsBackend(), "moe_experts", "fp32", "N=4", "pairs marked -1")
    assert [r.status for r in results] == [PASS, FAIL, FAIL], results


def test_routing_without_the_correction_bias_fails_noaux_tc():
    report = run(doubles.NoBiasRoutingBackend(), ("moe_route",))
    failed = {r.case for r in by_status(report, FAIL)}
    assert failed and all(case.startswith("noaux_tc") for case in failed)
    assert "noaux_tc: no correction bias N=16" not in failed
    assert all("picked other experts" in r.detail for r in by_status(report, FAIL))
    assert all(r.status == PASS for r in report.results if not r.case.startswith("noaux_tc"))


def test_expert_order_within_a_token_does_not_matter():
    report = run(doubles.ShuffledRoutingBackend(), ("moe_route",))
    assert by_status(report, PASS) == report.results


def test_an_op_that_raises_is_a_failure_not_a_skip():
    report = run(doubles.CrashingRotaryBackend(), ("rotary",))
    assert report.results and all(r.status == FAIL and "raised RuntimeError" in r.detail for r in report.results)


def test_greedy_divergence_passes_only_on_a_near_tie():
    class Model:  # the reference's logits after the shared prefix: token 5 leads token 6 by `margin`
        def __init__(self, margin):
            self.margin = margin

        def logits(self, tokens):
            logits = torch.zeros(1, tokens.shape[1], 8)
            logits[0, -1, 5], logits[0, -1, 6] = 10.0, 10.0 - self.margin
            return logits

    tol = TOLERANCES["model"]["bf16"]
    for margin, ok in ((0.01, True), (5.0, False)):
        reference = Greedy([[1, 2]], [[3, 5, 7]], Model(margin))
        passed, _, detail = CHECKS["greedy"](Greedy([[1, 2]], [[3, 6, 7]], None), reference, {}, tol)
        assert passed is ok, detail
        assert "token 1" in detail


# ---- what cannot run is skipped, with the reason ---------------------------------------------------

def test_unbuilt_backend_skips_every_row_and_never_passes():
    report = run_conformance(None, TEST_PLAN, requested="cuda", reason="cannot build backend cuda: no GPU")
    assert len(report.results) == len(build_cases(TEST_PLAN))
    assert all(r.status == SKIPPED and r.detail == "cannot build backend cuda: no GPU" for r in report.results)
    assert report.exit_code == 0 and not report.to_json()["built"]


def test_missing_fp8_and_missing_op_are_skipped_with_reasons():
    report = run(doubles.NoFp8Backend(), ("linear_fp8", "mla_decode", "model"), ("fp8",))
    assert report.results and all(r.status == SKIPPED for r in report.results)
    assert all("has no FP8" in r.detail for r in report.results)
    report = run(doubles.NoFp8Backend(), ("mla_decode",), ("bf16",))
    assert report.results and all(r.detail == "nofp8 does not implement mla_decode at bf16" for r in report.results)


def test_an_emulated_backend_reports_emulated_never_pass():
    report = run(doubles.EmulatedBackend(), ("rms_norm",))
    assert report.results and all(r.status == EMULATED for r in report.results)
    assert report.to_json()["emulation"] == doubles.EmulatedBackend.emulation and report.exit_code == 0


# ---- the command -----------------------------------------------------------------------------------

def test_cli_reports_a_wrong_backend_and_exits_1(monkeypatch, tmp_path, capsys):
    register(monkeypatch, "wrong_rms", "WrongRmsNormBackend")
    out = tmp_path / "out" / "row.json"
    code = main(["conformance", "--backend", "wrong_rms", "--op", "rms_norm", "--precision", "fp32", "--quick",
                 "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "failures:" in printed and "rms_norm fp32 [D=7168 M=1]: error" in printed
    assert "tolerances" in printed and all(op in printed.split("tolerances")[1] for op in SUITE_OPS)
    data = json.loads(out.read_text())
    assert {"device", "backend", "date", "torch", "rows", "built"} <= set(data)
    assert data["device"] == "cpu" and data["rows"] and all(r["status"] == FAIL for r in data["rows"])
    assert all(isinstance(r["error"], float) and r["error"] > r["tolerance"] for r in data["rows"])


def test_cli_skips_a_backend_that_cannot_be_built(monkeypatch, tmp_path, capsys):
    register(monkeypatch, "broken", "UnbuildableBackend")
    out = tmp_path / "broken.json"
    code = main(["conformance", "--backend", "broken", "--op", "rms_norm", "rotary", "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert code == 5 and not data["built"]  # nothing checked: non-zero, as pytest with no tests
    assert data["rows"] and all(r["status"] == SKIPPED for r in data["rows"])
    assert all(r["detail"].startswith("cannot build backend broken: ImportError: No module named 'torch_npu'")
               for r in data["rows"])
    assert "pass" not in {r["status"] for r in data["rows"]} and "skipped" in printed


def test_cli_usage_errors_exit_2(capsys):
    assert main(["conformance", "--backend", "no-such-backend"]) == 2
    assert "unknown backend 'no-such-backend'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["conformance", "--precision", "fp16"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["conformance", "--quick", "--full"])
    assert exit_info.value.code == 2


# ---- ci/merge_matrix.py ----------------------------------------------------------------------------

def merge_module():
    spec = importlib.util.spec_from_file_location("merge_matrix", ROOT / "ci" / "merge_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(backend, precision, fp8_format, rows, device="cuda:0", name="NVIDIA H100 80GB HBM3", built=True):
    return dict(schema=1, date="2026-11-23 10:00 UTC", device=device, device_name=name, built=built, backend=backend,
                requested="auto", reason="test", emulation=None, fp8_format=fp8_format, fp8_max=448.0,
                precision=precision, plan="full", torch="2.13.0", rows=rows)


def row(op, precision, status, error=None, case="c", detail=""):
    return dict(op=op, precision=precision, case=case, status=status, error=error, tolerance=0.02, detail=detail)


EXPECTED_MATRIX = """\
# dsv3 conformance matrix

| row | hardware | device | backend | precision | FP8 | emulation | date | torch | pass | emulated | fail | skipped | check |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| h100 | NVIDIA H100 / H800 (sm_90) | NVIDIA H100 80GB HBM3 | cuda | fp8 | e4m3fn | no | 2026-11-23 10:00 UTC | 2.13.0 | 2 | 0 | 1 | 0 | 1 failed |
| a100 | NVIDIA A100 (sm_80, no FP8) | - | (cuda) | (bf16) | (none) | - | - | - | - | - | - | - | no result |
| mi300x | AMD MI300X / MI325X (gfx942) | AMD Instinct MI300X | reference | bf16 | e4m3fnuz | no | 2026-11-23 10:00 UTC | 2.13.0 | 1 | 0 | 0 | 0 | backend reference, expected rocm; precision bf16, expected fp8 |
| mi355x | AMD MI355X (gfx950) | - | (rocm) | (fp8) | (e4m3fn) | - | - | - | - | - | - | - | no result |
| ascend-910b | Huawei Ascend 910B (no FP8) | - | (ascend) | (bf16) | (none) | - | - | - | - | - | - | - | no result |
| cpu | CPU (x86-64, GitHub-hosted) | x86_64 | reference | bf16 | e4m3fn | no | 2026-11-23 10:00 UTC | 2.13.0 | 1 | 0 | 0 | 1 | ok |

## Ops

| op | precision | h100 | mi300x | cpu |
|---|---|---|---|---|
| linear_fp8 | fp8 | pass 2/2 | pass 1/1 | pass 1/2 (1 skipped) |
| rms_norm | bf16 | **FAIL 1/1** | - | - |

## Failures

- h100: rms_norm bf16 [D=7168 M=1]: error 5.00e-01 > 2.00e-02; wrong
"""


def write_samples(directory: Path) -> list[Path]:
    reports = {
        "h100": sample("cuda", "fp8", "e4m3fn", [row("linear_fp8", "fp8", "pass", 0.001),
                                                  row("linear_fp8", "fp8", "pass", 0.002),
                                                  row("rms_norm", "bf16", "fail", 0.5, "D=7168 M=1", "wrong")]),
        "mi300x": sample("reference", "bf16", "e4m3fnuz", [row("linear_fp8", "fp8", "pass", 0.0)],
                         name="AMD Instinct MI300X"),
        "cpu": sample("reference", "bf16", "e4m3fn", [row("linear_fp8", "fp8", "pass", 0.0),
                                                       row("linear_fp8", "fp8", "skipped", detail="why")],
                      device="cpu", name="x86_64"),
    }
    paths = []
    for name, report in reports.items():
        paths.append(directory / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    return paths


def test_merge_turns_sample_reports_into_the_expected_matrix(tmp_path):
    merge = merge_module()
    paths = write_samples(tmp_path)
    markdown, code = merge.merge({p.stem: merge.load_result(p) for p in paths}, merge.load_rows())
    assert markdown == EXPECTED_MATRIX
    assert code == 1   # a failure on h100 and the wrong backend on mi300x


def test_merge_script_runs_from_the_command_line(tmp_path):
    cpu = write_samples(tmp_path)[-1]
    done = subprocess.run([sys.executable, str(ROOT / "ci" / "merge_matrix.py"), str(cpu)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "| cpu | CPU (x86-64, GitHub-hosted) | x86_64 | reference | bf16 |" in done.stdout
    assert "| h100 | NVIDIA H100 / H800 (sm_90) | - | (cuda) | (fp8) |" in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert merge_module().main([str(bad)]) == 2


def test_merge_flags_a_backend_that_was_not_built_and_lists_rows():
    merge = merge_module()
    unbuilt = sample("cuda", None, None, [row("rms_norm", "bf16", "skipped", detail="no GPU")], built=False)
    found = merge.problems(unbuilt, {"backend": "cuda", "precision": "fp8", "fp8_format": "e4m3fn"})
    assert found[0] == "backend not built: test" and "precision None, expected fp8" in found
    emulated = dict(sample("ascend", "bf16", None, [row("rms_norm", "bf16", "emulated", 0.0)]), emulation="cpu")
    assert merge.problems(emulated, {"backend": "ascend", "precision": "bf16"}) == [
        "emulated (cpu) on a hardware row"]
    assert merge.problems(emulated, None) == []   # a file of no matrix.yaml row: only failures count
    failing = sample("ascend", "bf16", None, [row("rms_norm", "bf16", "fail", 0.5)])
    assert merge.problems(failing, None) == ["1 failed"]
    ids = [r["id"] for r in merge.load_rows()]
    assert ids == ["h100", "a100", "mi300x", "mi355x", "ascend-910b", "cpu"]


# ---- one row per backend, by marker ----------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.exhaustive
def test_reference_row_passes_its_own_suite():
    report = run_conformance(ReferenceBackend(), TEST_PLAN)
    assert {r.op for r in report.results} == set(SUITE_OPS)
    assert {c.check for c in build_cases(TEST_PLAN)} == set(CHECKS)
    assert by_status(report, PASS) == report.results, [r for r in report.results if r.status != PASS]


def vendor_row(name: str, plan: str = "quick", **options):
    if name not in BACKENDS:
        pytest.skip(f"backend {name} is not registered (backends/{name}.py)")
    try:
        backend = importlib.import_module("dsv3.backends.registry").create_backend(name, **options)
    except Exception as e:  # no device or vendor packages here: this row cannot run on this machine
        pytest.skip(f"backend {name} cannot be built here: {type(e).__name__}: {e}")
    report = run_conformance(backend, plan)
    assert not by_status(report, FAIL), [r for r in report.results if r.status == FAIL]
    assert by_status(report, PASS) or by_status(report, EMULATED)
    return report


@pytest.mark.cuda
@pytest.mark.gpu
def test_cuda_row():
    vendor_row("cuda")


@pytest.mark.rocm
def test_rocm_row():
    vendor_row("rocm")


@pytest.mark.ascend
def test_ascend_row():
    vendor_row("ascend")


@pytest.mark.ascend
@pytest.mark.emulated
@pytest.mark.slow
@pytest.mark.exhaustive
def test_ascend_row_on_the_npu_emulation(monkeypatch):
    emulation = Path(__file__).resolve().parents[1] / "npu_emulation"
    if not (emulation / "torch_npu").is_dir():
        pytest.skip("tests/npu_emulation is not there")
    saved = sys.modules.pop("torch_npu", None)
    monkeypatch.syspath_prepend(str(emulation))
    try:
        report = run_conformance(importlib.import_module("dsv3.backends.registry").create_backend(
            "ascend", device="cpu", chip=describe_chip("huawei", "ascend910b")), TEST_PLAN)
    finally:
        sys.modules.pop("torch_npu", None)
        if saved is not None:
            sys.modules["torch_npu"] = saved
    assert not by_status(report, FAIL), [r for r in report.results if r.status == FAIL]
    assert not by_status(report, PASS)  # an emulation never passes as hardware
    assert by_status(report, EMULATED) and all("no FP8" in r.detail for r in by_status(report, SKIPPED))


def test_model_logits_check_tells_precision_noise_from_a_wrong_result():
    from dsv3.conformance.checks import check_logits

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(2, 12, 64, generator=g)
    reference = exact + 0.3 * torch.randn(exact.shape, generator=g)  # the precision's own rounding noise
    honest = exact + 0.3 * torch.randn(exact.shape, generator=g)     # as far from exact, elsewhere
    wrong = 2.0 * exact                                                # e.g. a scale off by two
    tol = TOLERANCES["model"]["fp8"]
    ok, _, note = check_logits(honest, reference, {"exact": exact}, tol)
    assert ok and "from exact fp32" in note
    ok, _, _ = check_logits(wrong, reference, {"exact": exact}, tol)
    assert not ok
    ok, error, note = check_logits(reference.clone(), reference, {"exact": exact}, tol)
    assert ok and error == 0 and note == ""
