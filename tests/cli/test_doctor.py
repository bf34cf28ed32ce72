"""`dsv3 doctor`, run as a user would: a subprocess, text and --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from dsv3.backends.interface import OPS
from dsv3.backends.platforms import probe

REPO = Path(__file__).resolve().parents[2]


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("DSV3_BACKEND", "DSV3_FP8_MAX")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "dsv3", "doctor", *args], capture_output=True, text=True,
                          cwd=REPO, env=environment, timeout=120)


def test_doctor_json_reports_machine_backend_fp8_and_ops():
    out = doctor("--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    chip = probe()
    assert (report["vendor"], report["arch"], report["count"]) == (chip.vendor, chip.arch, chip.count)
    assert report["memory_bytes"] == chip.memory_bytes > 0
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["cuda"] == torch.version.cuda and report["versions"]["rocm"] == torch.version.hip
    backend = report["backend"]
    assert backend["error"] is None and backend["name"] and backend["reason"]
    assert set(OPS) <= set(report["ops"]) and all(report["ops"].values())
    assert report["fp8"]["native"] == (backend["name"] != "reference" and chip.fp8_format is not None)
    fp8_checkpoint = report["precision_auto"]["fp8_checkpoint"]
    assert fp8_checkpoint["precision"] == ("fp8" if report["fp8"]["native"] else "bf16")
    if chip.vendor == "cpu":
        assert (backend["name"], backend["device"]) == ("reference", "cpu")
        assert backend["reason"].startswith("no accelerator found")
        assert report["fp8"]["format"] == "e4m3fn" and not report["fp8"]["native"]  # emulated only


def test_doctor_text_has_one_line_per_fact_and_every_op():
    out = doctor()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for label in ("device", "vendor", "arch", "memory", "versions", "backend", "FP8", "ops"):
        assert any(line.split()[0] == label for line in lines if line.strip()), label
    for op in OPS:
        assert any(line.split()[:1] == [op] for line in lines), op
    assert f"torch {torch.__version__}" in out.stdout


def test_doctor_follows_dsv3_backend_and_reports_a_bad_one_in_one_line():
    out = doctor("--json", env={"DSV3_BACKEND": "reference"})
    report = json.loads(out.stdout)
    assert report["backend"]["name"] == "reference" and report["backend"]["reason"] == "DSV3_BACKEND=reference"
    bad = doctor("--backend", "nope")
    assert bad.returncode == 2
    (line,) = [line for line in bad.stdout.splitlines() if line.startswith("backend")]
    assert "unknown backend 'nope'" in line and "choose auto" in line


def test_doctor_imports_no_vendor_module_when_the_reference_backend_runs():
    code = ("import sys, io, contextlib\n"
            "from dsv3.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(['doctor', '--json', '--backend', 'reference'])\n"
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'torch_npu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "[]"]
