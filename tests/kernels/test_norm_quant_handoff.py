"""RMSNorm hands its FP8 copy to the linears that read it (QuantizedActivation), changing no result.

1. The reference backend ignores the request and reads a QuantizedActivation's values (CPU).
2. The Triton path (the kernels CudaBackend runs, here through RocmBackend for gfx950 (e4m3fn) and gfx942
   (e4m3fnuz) under TRITON_INTERPRET=1, in a subprocess): the fused copy is bit for bit the one the linear
   would make; linears and the routed experts give the same bits from it; the whole tiny FP8 model gives
   the same logits with the hand-off as without it. The same checks on the GPU are in test_cuda_backend.py.
"""

from __future__ import annotations

import pytest
import torch
from dsv3.backends.interface import QuantizedActivation, plain
from dsv3.backends.reference import ReferenceBackend

from tests.run_helpers import check_ran, run_python


def test_reference_ignores_the_request_and_reads_the_values():
    ref = ReferenceBackend()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g).bfloat16()
    residual = torch.randn(3, 256, generator=g).bfloat16()
    weight = torch.rand(256, generator=g).bfloat16() + 0.5
    out = ref.rms_norm(x, weight, 1e-6, residual, quantize=True)
    assert out.quantized is None and out.activation is out.values
    normed, expected = out.values, ref.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(normed, expected.values) and torch.equal(out.residual, expected.residual)
    from dsv3.backends import fp8
    w, s = fp8.quantize_blocks(torch.randn(64, 256, generator=g) / 16)
    linear = ref.prepare_linear(w, s, "fp8")
    wrong_copy = QuantizedActivation(normed, torch.zeros(3, 256, dtype=torch.float8_e4m3fn), torch.ones(2, 3).t())
    assert torch.equal(ref.linear(wrong_copy, linear), ref.linear(normed, linear))
    assert plain(wrong_copy) is normed and wrong_copy.shape == normed.shape


HANDOFF_INTERPRETED = """
import tempfile
import torch
from dsv3.backends import fp8
from dsv3.backends.platforms import describe_chip
from dsv3.backends.interface import QuantizedActivation
from dsv3.backends.rocm import RocmBackend
from dsv3 import load_model
from dsv3.checkpoint import save_checkpoint
from dsv3.config import load_config
from dsv3.model import RMSNorm
from dsv3.checkpoint import RandomSource

g = torch.Generator().manual_seed(0)
for arch in ("gfx950", "gfx942"):
    backend = RocmBackend("cpu", describe_chip("amd", arch))
    caps = backend.capabilities
    # 1 and 5 rows: the norm kernel quantizes (up to 16), 80: the norm, then the quantization kernel; the
    # linear takes the split-K decode GEMM up to 64 rows, the tiled one above
    for rows in (1, 5, 80):
        x = torch.randn(rows, 384, generator=g).bfloat16()
        x[0, :128] = 0  # an all-zero 128-block
        residual = torch.randn(rows, 384, generator=g).bfloat16()
        weight = torch.rand(384, generator=g).bfloat16() + 0.5
        out = backend.rms_norm(x, weight, 1e-6, residual, quantize=True)
        out_plain = backend.rms_norm(x, weight, 1e-6, residual)
        fused, values = out.activation, out_plain.values
        assert isinstance(fused, QuantizedActivation) and out_plain.quantized is None, arch
        assert torch.equal(fused.values, values) and torch.equal(out.residual, out_plain.residual)
        q, s = backend.quantize_activation(values)
        assert fused.q.dtype == caps.fp8_dtype and fused.scales.stride() == s.stride()
        assert torch.equal(fused.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(fused.scales, s)
        w, ws = fp8.quantize_blocks(torch.randn(200, 384, generator=g) / 20)
        linear = backend.prepare_linear(w, ws, "fp8")
        assert torch.equal(backend.linear(fused, linear), backend.linear(values, linear)), (arch, rows)

    # routed experts from the copy
    num_experts, hidden, inter = 4, 256, 128
    gate_up, gate_up_scale = fp8.quantize_blocks(torch.randn(num_experts, 2 * inter, hidden, generator=g) / 16)
    down, down_scale = fp8.quantize_blocks(torch.randn(num_experts, hidden, inter, generator=g) / 11)
    experts = backend.prepare_experts(gate_up, gate_up_scale, down, down_scale, "fp8")
    for tokens in (1, 40):
        x = torch.randn(tokens, hidden, generator=g).bfloat16()
        fused = backend.rms_norm(x, torch.ones(hidden, dtype=torch.bfloat16), 1e-6, quantize=True).activation
        ids = torch.rand(tokens, num_experts, generator=g).topk(2, dim=-1).indices
        weights = torch.rand(tokens, 2, generator=g)
        assert torch.equal(backend.moe_experts(fused, weights, ids, experts),
                           backend.moe_experts(fused.values, weights, ids, experts)), (arch, tokens)
    print(arch, "ops ok")

# the whole tiny model: the same logits with and without the hand-off
config = load_config("tiny")
source = RandomSource(config, fp8=True, seed=3)
path = save_checkpoint(tempfile.mkdtemp() + "/tiny", {n: source.get(n) for n in sorted(source.names())},
                       config.to_dict())
backend = RocmBackend("cpu", describe_chip("amd", "gfx950"))
model = load_model(path, backend=backend, precision="fp8", max_seq_len=32, quiet=True)
tokens = torch.randint(2, 400, (2, 9), generator=torch.Generator().manual_seed(1))
norms = [n for layer in model.transformer.layers
         for n in (layer.attn_norm, layer.ffn_norm, getattr(layer.attn, "q_a_norm", None)) if isinstance(n, RMSNorm)]
assert norms and all(n.quantize for n in norms)
calls = []
original = backend.quantize_activation
backend.quantize_activation = lambda x: calls.append(x.shape[0]) or original(x)
with_handoff = model.logits(tokens)
handed_off = len(calls)
for n in norms:
    n.quantize = False
calls.clear()
without = model.logits(tokens)
assert len(calls) > handed_off, (len(calls), handed_off)  # the linears quantized for themselves this time
assert torch.equal(with_handoff, without)
print("model ok", handed_off, len(calls))
"""


@pytest.mark.slow
@pytest.mark.emulated
def test_triton_handoff_is_bit_exact_under_the_interpreter():
    pytest.importorskip("triton")
    check_ran(run_python(HANDOFF_INTERPRETED, interpret=True), "model ok")
