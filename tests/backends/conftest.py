"""The emulated torch_npu (tests/npu_emulation), shared by the Ascend backend's tests and the emulation's own."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EMULATION_DIR = Path(__file__).resolve().parents[1] / "npu_emulation"


@pytest.fixture(scope="module")
def npu():
    """The emulated torch_npu, importable as `torch_npu` only while this module's tests run."""
    saved = sys.modules.pop("torch_npu", None)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EMULATION_DIR))
        mp.delenv("DSV3_ASCEND_PLAIN", raising=False)
        module = importlib.import_module("torch_npu")
        assert Path(module.__file__).is_relative_to(EMULATION_DIR), "a real torch_npu shadowed the emulation"
        try:
            yield module
        finally:
            sys.modules.pop("torch_npu", None)
            if saved is not None:
                sys.modules["torch_npu"] = saved
