"""The DP engine stands in for LLMEngine wherever the engine loop and the Model use one: it has every
attribute they read of their engine (the gloo tests in tests/server/test_multi_rank.py run it)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import dsv3
from dsv3.serving.data_parallel import DataParallelEngine


def test_it_has_every_engine_attribute_the_loop_and_the_model_read():
    root = Path(dsv3.__file__).parent
    used = {name for user in ("serving/async_engine.py", "llm.py")
            for name in re.findall(r"\bself\.engine\.([a-z_]+)", (root / user).read_text())}
    assigned = set(re.findall(r"\bself\.([a-z_]+) =", inspect.getsource(DataParallelEngine)))
    missing = sorted(name for name in used if not hasattr(DataParallelEngine, name) and name not in assigned)
    assert len(used) >= 10 and not missing, missing
