"""The FP8 GEMM's split-K in one launch (backends/triton_kernels/gemm.py): the program that draws a
tile's last ticket sums every split's fp32 partial in split order, so the output is bit for bit the
sum a separate kernel would make, whichever program finished last, and the tickets are zero again
after every call.

The kernel runs under TRITON_INTERPRET=1 in a subprocess (set before triton is imported). Its
inputs are small integers in FP8, so each 128-wide FP8 dot is exact in fp32 whatever the order of
its products, and the expected output can be computed bit for bit in plain torch: per split, the
fp32 accumulator over its K blocks as the kernel adds them, then the splits summed from zero in
split order and rounded once.
"""

from __future__ import annotations

import pytest
import torch

from tests.run_helpers import check_ran, run_python

triton = pytest.importorskip("triton")

SPLIT_REDUCE = """
import itertools
import torch
from triton.runtime import interpreter
from dsv3.backends.triton_kernels import gemm
from dsv3.backends.triton_kernels.configs import PORTABLE

g = torch.Generator().manual_seed(0)

def small_integers(rows, cols):  # exact in e4m3fn, and their 128-term dot products exact in fp32
    return torch.randint(-8, 9, (rows, cols), generator=g).float().to(torch.float8_e4m3fn)

def two_kernel_sum(qa, sa, w, sw, splits, out_dtype):
    # the partials of the old split kernel and the in-order sum of the old _sum_splits_kernel, in torch
    m, k = qa.shape
    k_blocks = -(-k // 128)
    per_split = -(-k_blocks // splits)
    a, b = qa.float(), w.float()
    column_scales = sw[torch.arange(w.shape[0]) // 128]
    total = torch.zeros(m, w.shape[0])
    for first in range(0, k_blocks, per_split):
        acc = torch.zeros_like(total)
        for kb in range(first, min(first + per_split, k_blocks)):
            cols = slice(kb * 128, (kb + 1) * 128)
            acc = acc + (a[:, cols] @ b[:, cols].t()) * sa[:, kb, None] * column_scales[None, :, kb]
        total = total + acc
    return total.to(out_dtype)

# the interpreter runs the grid in order, so the last split draws the last ticket; "reversed" runs each
# tile's splits last to first, so split 0 sums the others' partials
builder = interpreter.interpreter_builder
in_order = type(builder).set_grid_idx
reversed_calls = []
def splits_reversed(x, y, z):
    reversed_calls.append(y)
    in_order(builder, x, builder.grid_dim[1] - 1 - y, z)

cpu = torch.device("cpu")
# N = 200: a partial last tile of 32 columns; K = 600: a partial last K block; bf16 and fp32 out in turn
cases = itertools.product((1, 3, 16), ((96, 640), (200, 600)), (1, 2, 5))
for index, (m, (n, k), splits) in enumerate(cases):
    out_dtype = (torch.bfloat16, torch.float32)[index % 2]
    qa, w = small_integers(m, k), small_integers(n, k)
    sa = torch.rand(m, -(-k // 128), generator=g) * 1e-2 + 1e-3
    sw = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-2 + 1e-3
    expected = two_kernel_sum(qa, sa, w, sw, splits, out_dtype)
    # with a split, twice: the second call also finds the tickets the first left zeroed
    for order in ("in order", "reversed") if splits > 1 else ("in order",):
        builder.set_grid_idx = splits_reversed if order == "reversed" else in_order.__get__(builder)
        got = gemm.fp8_gemm(qa, sa, w, sw, out_dtype, PORTABLE, num_sms=4, num_splits=splits)
        assert got.dtype == out_dtype
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (m, n, k, splits, order)
        if splits > 1:
            assert not gemm.tile_counters(cpu, 1).any(), (m, n, k, splits, order)
assert reversed_calls and min(reversed_calls) == 0

# the split the table chooses (no override): the same sum
m, n, k = 2, 64, 1024
qa, w = small_integers(m, k), small_integers(n, k)
sa, sw = torch.rand(m, 8, generator=g) + 0.5, torch.rand(1, 8, generator=g) + 0.5
splits = gemm.choose_splits(1, 2, 8, 4, PORTABLE.decode_waves)
assert splits == 4, splits
got = gemm.fp8_gemm(qa, sa, w, sw, torch.bfloat16, PORTABLE, num_sms=4)
assert torch.equal(got, two_kernel_sum(qa, sa, w, sw, splits, torch.bfloat16))
print("split reduce ok")
"""


@pytest.mark.emulated
def test_one_launch_split_sum_is_the_two_kernel_sum_bit_for_bit():
    check_ran(run_python(SPLIT_REDUCE, interpret=True), "split reduce ok")


def test_choose_splits_leaves_no_split_under_two_k_blocks():
    from dsv3.backends.triton_kernels.gemm import MIN_SPLIT_BLOCKS, choose_splits

    for k_blocks in range(1, 90):
        for tiles, sms, waves in ((1, 132, 4.0), (9, 132, 4.0), (33, 304, 2.0), (512, 132, 4.0), (3, 4, 2.0)):
            splits = choose_splits(1, tiles, k_blocks, sms, waves)
            per_split = -(-k_blocks // splits)
            assert -(-k_blocks // per_split) == splits  # no empty split
            assert splits <= max(1, round(waves * sms / tiles))
            if splits > 1:
                assert k_blocks - (splits - 1) * per_split >= MIN_SPLIT_BLOCKS, (k_blocks, tiles, splits)
    # V3's kv_a alone (576 x 7168 in 64-column tiles) on 132 SMs: 28 splits of 2 blocks, not 56 of 1
    assert choose_splits(1, 9, 56, 132, 4.0) == 28
    # V2-Lite's kv_b (4096 x 512: 4 K blocks): 2 splits; 3 K blocks: none
    assert choose_splits(1, 64, 4, 132, 4.0) == 2
    assert choose_splits(1, 64, 3, 132, 4.0) == 1
    # V2-Lite's shared gate+up (5632 x 2048: 16 blocks, 88 tiles): 6 splits of 3 would leave the last 1
    assert choose_splits(1, 88, 16, 132, 4.0) == 4


def test_tile_counters_grow_and_keep_what_graphs_may_hold(monkeypatch):
    from dsv3.backends.triton_kernels import gemm

    monkeypatch.setattr(gemm, "_tile_counters", {})
    monkeypatch.setattr(gemm, "_outgrown_counters", [])
    cpu = torch.device("cpu")
    first = gemm.tile_counters(cpu, 10)
    assert first.dtype == torch.int32 and first.numel() == gemm.MIN_TILE_COUNTERS and not first.any()
    assert gemm.tile_counters(cpu, gemm.MIN_TILE_COUNTERS) is first
    grown = gemm.tile_counters(cpu, gemm.MIN_TILE_COUNTERS + 1)
    assert grown.numel() == 2 * gemm.MIN_TILE_COUNTERS and not grown.any()
    assert gemm.tile_counters(cpu, 1) is grown
    assert gemm._outgrown_counters == [first]  # a graph recorded with the first buffer may still replay


def test_tile_counters_refuse_to_grow_inside_a_graph_capture(monkeypatch):
    """A capture must not allocate what outlives it: too few counters there is a BackendError naming the fix
    (on the CPU the capture is stood in for by a cuda device and is_current_stream_capturing)."""
    from dsv3.backends.errors import BackendError
    from dsv3.backends.triton_kernels import gemm

    monkeypatch.setattr(gemm, "_tile_counters", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(BackendError, match="run the call once before recording it"):
        gemm.tile_counters(torch.device("cuda", 0), 10)
    assert gemm._tile_counters == {}
