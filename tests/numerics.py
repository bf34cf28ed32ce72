"""Numeric helpers the tests share: the conformance suite's row error and the adversarial activations.

Importable as `numerics` (conftest puts tests/ on sys.path) and as `tests.numerics` from code run in a
fresh interpreter (run_helpers puts the repository there).
"""

from __future__ import annotations

import torch

from dsv3.conformance.checks import row_error

__all__ = ["adversarial", "row_error"]


def adversarial(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """bf16 activations [m, k] with an all-zero 128-block, a value beyond FP8's max (3000) and an all-zero
    last row (whose output must be exactly zero)."""
    x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
    x[0, :128] = 0
    if m > 1:
        x[1, 3] = 3000.0
        x[-1] = 0
    return x
