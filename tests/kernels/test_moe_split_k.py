"""Split-K in the grouped MoE GEMMs (backends/triton_kernels/moe.py): at decode each output tile's K
loop runs over several programs, whose fp32 partials the program that draws the tile's last ticket
adds in split order before the unchanged epilogue (SwiGLU and quantization; routing weight and
combine).

Under TRITON_INTERPRET=1 in a subprocess (set before triton is imported):
- FP8 and BF16 experts, 1, 2 and 5 tokens, top-k 2 to 8, forced splits 1, 2 and 3 of K blocks that
  they do not divide: against the unsplit kernel (only the order of fp32 sums differs) and the
  reference backend; two calls in a row, the tickets zero after each.
- Bit for bit against a torch emulation of the split order: fp32 experts with inputs that make every
  128-wide dot exact but not the sums across K blocks, once to test gate_up's sum (down only selects)
  and once down's (gate_up exact), with each tile's splits run in order and, for 3 splits, in reverse
  (split 0 then draws the last ticket). The unsplit kernel gives other bits, so the check can tell the orders apart.
"""

from __future__ import annotations

import pytest

from tests.run_helpers import check_ran, run_python

pytest.importorskip("triton")

pytestmark = pytest.mark.emulated

AGAINST_UNSPLIT = """
import torch
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.triton_kernels import gemm, moe
from dsv3.backends.triton_kernels.configs import PORTABLE
from tests.numerics import row_error

g = torch.Generator().manual_seed(0)
num_experts, hidden, inter = 8, 384, 384  # 3 K blocks in each GEMM: split 2 takes 2 and 1
gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
down = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
ref = ReferenceBackend()
for precision in ("fp8", "bf16"):
    experts = ref.prepare_experts(gate_up, None, down, None, precision)
    for case, (tokens, top_k) in enumerate(((1, 8), (2, 3), (5, 2))):
        ids = torch.rand(tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
        weights = torch.rand(tokens, top_k, generator=g) + 0.1
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        run = lambda splits: moe.moe_experts(  # noqa: E731
            x, weights, ids, experts.gate_up, experts.gate_up_scale, experts.down, experts.down_scale, PORTABLE,
            quant=(448.0, False), num_splits=splits)
        unsplit = run(1)
        expected = ref.moe_experts(x, weights, ids, experts)
        assert row_error(unsplit, expected) <= 8e-3, (precision, tokens)
        splits = 2 + (case + (precision == "bf16")) % 2  # each precision and split with 1 and 5 tokens
        got = run(splits)
        label = (precision, tokens, top_k, splits)
        assert row_error(got, unsplit) <= 1e-3, (label, row_error(got, unsplit))
        assert row_error(got, expected) <= 8e-3, (label, row_error(got, expected))
        assert not gemm.tile_counters(torch.device("cpu"), 1).any(), label
    assert torch.equal(run(splits), got), precision  # a second call finds the tickets zeroed
print("split ok")
"""

SPLIT_ORDER = """
import torch
from triton.runtime import interpreter
from dsv3.backends.triton_kernels import gemm, moe
from dsv3.backends.triton_kernels.configs import PORTABLE

g = torch.Generator().manual_seed(1)
num_experts, hidden, inter, tokens, top_k = 4, 640, 640, 3, 2  # 5 K blocks in each GEMM

EXPONENTS = torch.tensor([0.0, 10.0, -12.0, -13.0, -14.0])  # per K block: sums across blocks round

def block_magnitudes(rows, cols, low, high):  # small integers times a power of two per 128 columns
    return torch.randint(low, high + 1, (rows, cols), generator=g).float() * (2.0 ** EXPONENTS).repeat_interleave(128)

def split_sum(a, w, splits):
    # a [K] @ w [N, K]^T as the kernel adds it: per split an fp32 accumulator over its K blocks, each
    # block's dot exact, then the splits from zero in split order
    k_blocks = -(-a.numel() // 128)
    per_split = -(-k_blocks // splits)
    total = torch.zeros(w.shape[0])
    for first in range(0, k_blocks, per_split):
        acc = torch.zeros(w.shape[0])
        for kb in range(first, min(first + per_split, k_blocks)):
            cols = slice(kb * 128, (kb + 1) * 128)
            acc = acc + (w[:, cols].double() @ a[cols].double()).float()
        total = total + acc
    return total

def emulated(x, weights, ids, gate_up, down, splits):
    out = torch.zeros(tokens, hidden)
    for n in range(tokens):
        for j in range(top_k):  # two terms per row: their sum does not depend on the atomics' order
            e = ids[n, j]
            gate, up = split_sum(x[n], gate_up[e, :inter], splits), split_sum(x[n], gate_up[e, inter:], splits)
            h = gate / (1.0 + torch.exp(-gate)) * up
            out[n] += split_sum(h, down[e], splits) * weights[n, j]
    return out

ids = torch.tensor([[0, 2], [2, 1], [0, 2]])  # expert 2 has three rows, expert 3 none
weights = torch.rand(tokens, top_k, generator=g) + 0.1
# gate_up's order: gate >= 128 (silu(gate) == gate in fp32) and down picks h[i] for column i
x_varied = block_magnitudes(tokens, hidden, 1, 4)
gate_up_varied = torch.cat((torch.randint(1, 5, (num_experts, inter, hidden), generator=g),
                            torch.randint(-4, 5, (num_experts, inter, hidden), generator=g)), dim=1).float()
select = torch.eye(hidden, inter).expand(num_experts, hidden, inter).contiguous()
# down's order: x = e_0, gate = 32 and up = column 0 of the up rows, whose 128-blocks vary in magnitude
x_one = torch.zeros(tokens, hidden)
x_one[:, 0] = 1.0
gate_up_one = torch.zeros(num_experts, 2 * inter, hidden)
gate_up_one[:, :inter, 0] = 32.0
gate_up_one[:, inter:, 0] = block_magnitudes(num_experts, inter, -4, 4)
down_ints = torch.randint(-4, 5, (num_experts, hidden, inter), generator=g).float()

builder = interpreter.interpreter_builder
in_order = builder.set_grid_idx
def splits_reversed(x, y, z):
    in_order(x, y, builder.grid_dim[2] - 1 - z)

for name, x, gate_up, down in (("gate_up", x_varied, gate_up_varied, select), ("down", x_one, gate_up_one, down_ints)):
    run = lambda splits: moe.moe_experts(x, weights, ids, gate_up, None, down, None, PORTABLE,  # noqa: E731
                                         num_splits=splits)
    unsplit = run(1)
    assert torch.equal(unsplit, emulated(x, weights, ids, gate_up, down, 1)), name
    for splits in (2, 3):
        expected = emulated(x, weights, ids, gate_up, down, splits)
        assert not torch.equal(expected, unsplit), (name, splits)  # the orders differ in some bits
        for order in (in_order, splits_reversed) if splits == 3 else (in_order,):
            builder.set_grid_idx = order
            got = run(splits)
            builder.set_grid_idx = in_order
            assert torch.equal(got, expected), (name, splits, order, (got - expected).abs().max())
            assert not gemm.tile_counters(torch.device("cpu"), 1).any(), (name, splits)
print("order ok")
"""


def test_split_k_against_unsplit_and_reference():
    check_ran(run_python(AGAINST_UNSPLIT, interpret=True), "split ok")


def test_split_k_sums_in_split_order_bit_for_bit():
    check_ran(run_python(SPLIT_ORDER, interpret=True), "order ok")


def test_split_only_where_the_grid_is_small():
    """The chosen split: decode grids (a tile per chosen expert) split to about decode_waves programs
    per SM, every split with 2 K blocks or more; prefill-sized grids and calls without num_sms do not."""
    from dsv3.backends.triton_kernels import moe
    from dsv3.backends.triton_kernels.configs import NVIDIA_SM90

    sms = 132
    v2_lite_gate_up = moe._splits(6 * 11, 16, NVIDIA_SM90, sms, None)  # 6 experts x 1408/128 columns, K 2048
    assert v2_lite_gate_up == (2, 8)
    v2_lite_down = moe._splits(6 * 16, 11, NVIDIA_SM90, sms, None)  # 2048/128 columns, K 1408
    assert v2_lite_down[1] > 1 and 11 - (v2_lite_down[1] - 1) * v2_lite_down[0] >= 2
    assert moe._splits(8 * 16, 56, NVIDIA_SM90, sms, None)[1] > 1  # V3 at one token
    assert moe._splits(64 * 11, 16, NVIDIA_SM90, sms, None) == (16, 1)  # V2-Lite, 64 tokens
    assert moe._splits(6 * 11, 16, NVIDIA_SM90, None, None) == (16, 1)
    assert moe._splits(6 * 11, 16, NVIDIA_SM90, None, 3) == (6, 3)
    assert moe._splits(6 * 11, 3, NVIDIA_SM90, None, 5) == (1, 3)  # capped at the K blocks
