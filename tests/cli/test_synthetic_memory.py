"""Random weights that cannot fit are refused before any is built, in one line (not a crash minutes later)."""

from __future__ import annotations

import subprocess
import sys

from dsv3.checks import available_bytes

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_a_dummy_load_of_deepseek_v3_on_this_cpu_is_refused_at_once(tmp_path):
    assert available_bytes("cpu") < 1300e9  # the full model's BF16 weights fit on no CI machine
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dummy_checkpoint.py"), str(tmp_path / "v3")],
                   check=True, capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--ckpt", str(tmp_path / "v3"),
                             "--load-format", "dummy", "--backend", "reference", "hi"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv3: error: the model's synthetic weights need about 13") and "GB free" in last, \
        result.stderr
