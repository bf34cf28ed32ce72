"""Running Python in a subprocess with the repository on its path, for what must start in a fresh
interpreter: TRITON_INTERPRET=1 has to be set before triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, interpret: bool, args: tuple[str, ...] = (), timeout: int = 300
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_ran(result: subprocess.CompletedProcess, marker: str) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert marker in result.stdout, result.stdout[-3000:]
    return result.stdout
