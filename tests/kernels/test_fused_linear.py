"""FusedLinear: linears that read one input run as one GEMM exactly where their weights stack."""

from __future__ import annotations

import pytest
import torch
from dsv3.backends import fp8
from dsv3.backends.reference import ReferenceBackend

from dsv3.model import FusedLinear, Linear


class Parts:
    """A loader stub: linear(module) gives the (weight, scale) it was built with."""

    def __init__(self, parts: dict):
        self.parts = parts

    def linear(self, module: str):
        return self.parts[module]


def random_parts(rows: list[int], cols: int, quantized: bool) -> dict:
    g = torch.Generator().manual_seed(sum(rows))
    parts = {}
    for i, r in enumerate(rows):
        w = torch.randn(r, cols, generator=g) / cols ** 0.5
        parts[f"p{i}"] = fp8.quantize_blocks(w) if quantized else (w.to(torch.bfloat16), None)
    return parts


@pytest.mark.parametrize("rows, stacks", [([1536, 576], True), ([256, 256], True), ([64, 80], False),
                                          ([128, 200, 64], False)])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_fused_equals_separate(rows, stacks, quantized, precision):
    backend = ReferenceBackend()
    parts = random_parts(rows, 256, quantized)
    fused = FusedLinear(backend, Parts(parts), list(parts), precision)
    assert len(fused.linears) == (1 if stacks else len(rows))
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    outs = fused(x)
    assert [o.shape for o in outs] == [torch.Size([3, 2, r]) for r in rows]
    for out, (w, s) in zip(outs, parts.values()):
        alone = Linear(backend, backend.prepare_linear(w, s, precision))(x)
        torch.testing.assert_close(out, alone, rtol=0, atol=0)


def test_mixed_kinds_stay_apart():
    backend = ReferenceBackend()
    parts = {**random_parts([128], 256, True), "dense": (torch.randn(128, 256).to(torch.bfloat16), None)}
    assert len(FusedLinear(backend, Parts(parts), ["p0", "dense"], "bf16").linears) == 2
