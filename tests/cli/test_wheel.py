"""The wheel is what `pip install dsv3` gives: built from this checkout, installed into a fresh folder and
run from outside the checkout, it carries the backends, the built-in configs and the tiny checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def listed_packages() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.M | re.S)
    return set(re.findall(r'"([\w.]+)"', block.group(1)))


def test_every_package_of_the_tree_is_listed_for_the_wheel():
    """A new folder of dsv3/ or backends/ must be named in pyproject.toml, or the wheel leaves it out."""
    found = {".".join(("dsv3", *p.parent.relative_to(ROOT / "dsv3").parts))
             for p in (ROOT / "dsv3").rglob("__init__.py")}
    found |= {".".join(("dsv3.backends", *p.parent.relative_to(ROOT / "backends").parts))
              for p in (ROOT / "backends").rglob("__init__.py")}
    found |= {"dsv3.configs"}
    assert found <= listed_packages(), f"missing from [tool.setuptools] packages: {sorted(found - listed_packages())}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout installed into a fresh --target folder (no dependencies: the test's own)."""
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                           capture_output=True, text=True, timeout=300, cwd=work)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    wheels = list((work / "dist").glob("dsv3-*.whl"))
    assert len(wheels) == 1, wheels
    target = work / "target"
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheels[0])],
                          capture_output=True, text=True, timeout=300, cwd=work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return target


def run_outside(target: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run with only the installed wheel importable as dsv3 (PYTHONPATH = the target, cwd = a temp dir)."""
    env = {**os.environ, "PYTHONPATH": str(target), "DSV3_BACKEND": "reference"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_wheel_runs_doctor_loads_every_config_and_generates(installed, tmp_path):
    where = run_outside(installed, "-c", "import dsv3, dsv3.backends; print(dsv3.__file__, dsv3.backends.__file__)",
                        tmp_path=tmp_path)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(str(installed) in path for path in where.stdout.split()), where.stdout  # not the checkout's

    doctor = run_outside(installed, str(installed / "bin" / "dsv3"), "doctor", tmp_path=tmp_path)
    assert doctor.returncode == 0, doctor.stdout[-2000:] + doctor.stderr[-3000:]

    configs = run_outside(installed, "-c", """
from dsv3.config import CONFIGS_DIR, load_config
names = sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))
for name in names:
    load_config(name)
print(" ".join(names))
""", tmp_path=tmp_path)
    assert configs.returncode == 0, configs.stderr[-3000:]
    built_in = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    assert configs.stdout.split() == built_in

    generated = run_outside(installed, str(installed / "bin" / "dsv3"), "generate", "Hello from dsv3.",
                            "--max-new-tokens", "4", tmp_path=tmp_path)
    assert generated.returncode == 0, generated.stdout[-2000:] + generated.stderr[-3000:]
    assert generated.stdout.strip()
