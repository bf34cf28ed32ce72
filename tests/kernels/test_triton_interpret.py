"""The shared Triton kernels (quant, gemm, moe) on the CPU under TRITON_INTERPRET=1, with e4m3fn and
e4m3fnuz inputs, against the reference backend's emulation.

TRITON_INTERPRET must be set before triton is imported, so each group of checks runs in a
subprocess. Exact where the math allows it: quantization is bit-identical; GEMM and MoE outputs
differ from the reference only by the order of fp32 sums (and the MoE's atomic combine).
"""

from __future__ import annotations

import pytest

from tests.run_helpers import check_ran, run_python

pytest.importorskip("triton")

pytestmark = pytest.mark.emulated

PRELUDE = """
import torch
from dsv3.backends import fp8
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.triton_kernels.configs import NVIDIA_SM90, PORTABLE
FORMATS = (("e4m3fn", torch.float8_e4m3fn, 448.0), ("e4m3fnuz", torch.float8_e4m3fnuz, 224.0))
from tests.numerics import adversarial as adversarial_with, row_error
g = torch.Generator().manual_seed(0)

def adversarial(m, k):
    return adversarial_with(m, k, g)
"""

QUANT = """
import itertools
from dataclasses import replace
from dsv3.backends.triton_kernels import norm, quant
for name, dtype, fp8_max in FORMATS:
    for ue8m0 in (False, True):
        x = adversarial(5, 300) * 3
        rq, rs = fp8.quantize_activation(x, dtype, fp8_max, ue8m0)
        for tile in (PORTABLE.quant, NVIDIA_SM90.quant_prefill):  # 16 rows a program: one, partly masked
            q, s = quant.quantize_activation(x, dtype, fp8_max, ue8m0, tile)
            assert s.stride() == (1, 5), s.stride()
            assert torch.equal(s, rs), (name, ue8m0)
            assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)), (name, ue8m0)
        ref = ReferenceBackend(fp8_format=name, fp8_max=fp8_max)
        w = torch.rand(300, generator=g).to(torch.bfloat16) + 0.5
        r = torch.randn(5, 300, generator=g).to(torch.bfloat16)
        # one program a row (5 rows > 4), and the row split over 3 and 2 programs (the last partly masked),
        # with and without the quantization (32 rows: both split)
        splits = (PORTABLE.norm, replace(PORTABLE.norm, block_m=32, block_n=128), replace(PORTABLE.norm, block_m=32))
        for residual, tile in itertools.product((None, r), splits):
            out, h, nq, ns = norm.rms_norm(x, w, 1e-6, residual, tile, (dtype, fp8_max, ue8m0))
            expected = ref.rms_norm(x, w, 1e-6, residual)
            expected_out = expected.values
            assert torch.equal(out, expected_out), (name, "rms_norm")
            if residual is not None:
                assert torch.equal(h, expected.residual)
            plain_out, plain_h, _, _ = norm.rms_norm(x, w, 1e-6, residual, tile)  # the norm alone: the same values
            assert torch.equal(plain_out, out) and (residual is None or torch.equal(plain_h, h))
            eq, es = fp8.quantize_activation(expected_out, dtype, fp8_max, ue8m0)
            assert torch.equal(ns, es) and torch.equal(nq.view(torch.uint8), eq.view(torch.uint8)), tile
print("quant ok")
"""

GEMM = """
import itertools
from dsv3.backends.triton_kernels import gemm, quant
from dataclasses import replace
from dsv3.backends.triton_kernels.configs import TileConfig
# the portable table, and one with a tile of its own for 2-16 rows (as sm_90's)
batch_tile = replace(PORTABLE, gemm_decode_batch=TileConfig(16, 64, 1, {"num_warps": 4, "num_stages": 2}))
for (name, dtype, fp8_max), configs in itertools.product(FORMATS, (PORTABLE, batch_tile)):
    ref = ReferenceBackend(fp8_format=name, fp8_max=fp8_max)
    # decode (split-K), decode with N and K not multiples of 128, tiled with partial tiles everywhere
    for m, n, k, splits in ((1, 96, 512, None), (3, 200, 300, None), (16, 130, 256, 1), (20, 200, 300, None)):
        x = adversarial(m, k)
        w, s = fp8.quantize_blocks(torch.randn(n, k, generator=g) / k ** 0.5, dtype)
        qa, sa = quant.quantize_activation(x, dtype, fp8_max, False, PORTABLE.quant)
        got = gemm.fp8_gemm(qa, sa, w, s, torch.bfloat16, configs, num_sms=4, num_splits=splits)
        expected = ref.linear(x, ref.prepare_linear(w, s, "fp8"))
        assert row_error(got, expected) <= 8e-3, (name, m, n, k, row_error(got, expected))
        if m > 1:
            assert (got[-1] == 0).all()
print("gemm ok")
"""

ROTARY = """
from dsv3.backends.triton_kernels.elementwise import rotary, swiglu
ref = ReferenceBackend()
# q's rope columns (a strided view of [B, T, H, 192]), kv_a's (3-d, strided), a contiguous fp32 tensor
q = torch.randn(3, 4, 5, 192, generator=g).to(torch.bfloat16)
kv = torch.randn(3, 4, 576, generator=g).to(torch.bfloat16)
for x in (q[..., 128:], kv[..., 512:], torch.randn(2, 1, 64, generator=g), q[:1, :, :, 128:]):
    b, t = x.shape[:2]
    angles = torch.rand(b, t, 32, generator=g) * 40
    got = rotary(x, angles.cos(), angles.sin())
    expected = ref.rotary(x, angles.cos(), angles.sin())
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    # fp32 math rounded once, like the reference; an FMA may move an fp32 result by one ulp
    assert row_error(got, expected) <= (1e-5 if x.dtype == torch.float32 else 8e-3), row_error(got, expected)
fused = (torch.randn(5, 2 * 1000, generator=g) * 4).to(torch.bfloat16)  # a gate+up output's halves
for gate, up in ((fused[:, :1000], fused[:, 1000:]), (fused[:2, :64].float(), fused[:2, 64:128].float())):
    got = swiglu(gate, up)
    expected = ref.swiglu(gate, up)
    assert got.dtype == gate.dtype and got.shape == gate.shape
    assert row_error(got, expected) <= (1e-5 if gate.dtype == torch.float32 else 8e-3), row_error(got, expected)
print("rotary and swiglu ok")
"""

MOE = """
from dsv3.backends.triton_kernels import moe
num_experts, hidden, inter, top_k, tokens = 6, 256, 128, 2, 9
def routing(pattern):
    ids = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
    if pattern == "one_expert_gets_all":
        ids[:, 0] = 4
        ids[:, 1] = torch.where(ids[:, 1] == 4, 5, ids[:, 1])
    elif pattern == "few_experts":  # experts 2..5 receive nothing
        ids = torch.stack((torch.zeros(tokens, dtype=torch.long), torch.ones(tokens, dtype=torch.long)), dim=1)
    elif pattern == "skipped":  # pairs marked -1 (another rank's experts): token 0 both, token 1 neither
        skipped = torch.rand(tokens, top_k, generator=g) < 0.5
        skipped[0], skipped[1] = True, False
        ids = ids.masked_fill(skipped, -1)
    elif pattern == "all_skipped":
        ids = torch.full((tokens, top_k), -1)
    weights = torch.rand(tokens, top_k, generator=g) + 0.1
    return weights.masked_fill(ids < 0, float("nan")), ids  # a skipped pair's weight is never read
gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
down = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
for name, dtype, fp8_max in FORMATS:
    ref = ReferenceBackend(fp8_format=name, fp8_max=fp8_max)
    for precision in ("fp8", "bf16"):
        if precision == "bf16" and name == "e4m3fnuz":
            continue
        experts = ref.prepare_experts(gate_up, None, down, None, precision)
        for pattern in ("random", "one_expert_gets_all", "few_experts", "skipped", "all_skipped"):
            weights, ids = routing(pattern)
            x = adversarial(tokens, hidden)
            got = moe.moe_experts(x, weights, ids, experts.gate_up, experts.gate_up_scale, experts.down,
                                  experts.down_scale, PORTABLE, quant=(fp8_max, False))
            expected = ref.moe_experts(x, weights, ids, experts)
            assert row_error(got, expected) <= 8e-3, (name, precision, pattern, row_error(got, expected))
            assert (got[-1] == 0).all()
            assert (got[(ids < 0).all(-1)] == 0).all(), pattern
# the sorting: every pair lands once, in its expert's tiles, padding rows hold the sentinel
ids = torch.tensor([[3, 0], [3, 1], [3, 0]])
pairs, tile_expert = moe.align_by_expert(ids, 4, 2)
valid = pairs[pairs < 6]
assert sorted(valid.tolist()) == list(range(6))
flat = ids.flatten()
for t, e in enumerate(tile_expert.tolist()):
    rows = pairs[2 * t: 2 * t + 2]
    rows = rows[rows < 6]
    assert e == 4 or (flat[rows] == e).all()
assert (tile_expert[:5] == torch.tensor([0, 1, 3, 3, 4], dtype=torch.int32)).all(), tile_expert
# one token (batch-1 decode): a tile per choice, no sort
pairs, tile_expert = moe.align_by_expert(torch.tensor([[5, 2]]), 6, 4)
assert pairs.tolist() == [0, 2, 2, 2, 1, 2, 2, 2] and tile_expert.tolist() == [5, 2], (pairs, tile_expert)
for name, dtype, fp8_max in FORMATS:
    ref = ReferenceBackend(fp8_format=name, fp8_max=fp8_max)
    experts = ref.prepare_experts(gate_up, None, down, None, "fp8")
    x = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
    for ids in (torch.tensor([[5, 2]]), torch.tensor([[-1, 2]]), torch.tensor([[-1, -1]])):  # -1: a skipped choice
        weights = (torch.rand(1, top_k, generator=g) + 0.1).masked_fill(ids < 0, float("nan"))
        got = moe.moe_experts(x, weights, ids, experts.gate_up, experts.gate_up_scale, experts.down,
                              experts.down_scale, PORTABLE, quant=(fp8_max, False))
        assert row_error(got, ref.moe_experts(x, weights, ids, experts)) <= 8e-3, (name, ids)
        assert (ids >= 0).any() or (got == 0).all(), ids
print("moe ok")
"""


def run_interpreted(code: str) -> None:
    check_ran(run_python(PRELUDE + code, interpret=True), " ok")


def test_quantization_and_fused_rms_norm_bit_exact():
    run_interpreted(QUANT)


def test_fp8_gemm_decode_and_tiled():
    run_interpreted(GEMM)


def test_rotary_and_swiglu_on_strided_views():
    run_interpreted(ROTARY)


def test_grouped_moe_fp8_and_bf16():
    run_interpreted(MOE)


def test_decode_gemm_tile_per_rows():
    """sm_90 runs one split-K tile at M = 1 and another at 2-16 rows; above 16, and on a table without the
    second tile, the M = 1 tile."""
    from dsv3.backends.triton_kernels.configs import NVIDIA_SM90, PORTABLE

    assert NVIDIA_SM90.decode_gemm_tile(1) is NVIDIA_SM90.gemm_decode
    assert NVIDIA_SM90.gemm_decode_batch not in (None, NVIDIA_SM90.gemm_decode)
    assert NVIDIA_SM90.decode_gemm_tile(2) is NVIDIA_SM90.decode_gemm_tile(16) is NVIDIA_SM90.gemm_decode_batch
    assert NVIDIA_SM90.decode_gemm_tile(17) is NVIDIA_SM90.gemm_decode
    assert PORTABLE.decode_gemm_tile(8) is PORTABLE.gemm_decode


def test_cuda_backend_capabilities_per_arch():
    """sm_90 has FP8 (e4m3fn, 448); sm_80 falls back to BF16; a non-NVIDIA chip is refused."""
    from dsv3.backends.cuda import CudaBackend
    from dsv3.backends.platforms import describe_chip

    hopper = CudaBackend("cuda", chip=describe_chip("nvidia", "sm_90"))
    assert hopper.capabilities.fp8_dtype is not None and hopper.capabilities.fp8_max == 448.0
    assert hopper.capabilities.native_fp8 and hopper.supports("linear_fp8", "fp8")
    assert hopper.capabilities.dist_backend == "nccl" and hopper.capabilities.name == "cuda"
    ampere = CudaBackend("cuda", chip=describe_chip("nvidia", "sm_80"))
    assert ampere.capabilities.fp8_dtype is None and not ampere.supports("linear_fp8", "fp8")
    assert ampere.supports("linear_bf16", "bf16") and "BF16 fallback" in ampere.capabilities.ops["linear_fp8"]
    with pytest.raises(ValueError, match="NVIDIA"):
        CudaBackend("cuda", chip=describe_chip("amd", "gfx942"))


def test_linear_fp8_description_is_read_off_the_dispatch():
    """Capabilities.ops["linear_fp8"] names, per M range, the GEMM linear_impl picks: with torch._scaled_mm
    the split-K kernel stops at scaled_mm_min_m, without it at decode_max_m."""
    from dsv3.backends.cuda import CudaBackend
    from dsv3.backends.platforms import describe_chip
    from dsv3.backends.triton_backend import ScaledMM

    hopper = CudaBackend("cuda", chip=describe_chip("nvidia", "sm_90"))
    c = hopper.configs
    assert hopper.linear_fp8_gemms() == (f"M 1-{c.decode_max_m}: triton fp8 gemm (decode, split-K); "
                                         f"M >= {c.decode_max_m + 1}: triton fp8 gemm (tiled)")
    hopper.scaled_mm = ScaledMM("view", pad_n=False)
    assert hopper.linear_fp8_gemms() == (f"M 1-{c.scaled_mm_min_m - 1}: triton fp8 gemm (decode, split-K); "
                                         f"M >= {c.scaled_mm_min_m}: torch._scaled_mm block-wise")
