"""The Triton MLA kernels (backends/triton_kernels/mla.py) over a paged cache, against the reference backend.

On the CPU the decode kernel runs under the Triton interpreter (TRITON_INTERPRET=1,
set in a subprocess before triton is imported) on FP32 inputs, since the
interpreter's BF16 dot is not faithful; the prefill (torch) runs as it is. Blocks are
shuffled over the pool, tables padded with zeros, sequences end on block boundaries and
one past them, and two sequences share prefix blocks. On an NVIDIA GPU decode and prefill
run in BF16 on random inputs, per-sequence lengths from 1 to 32k, batch 1 and 256, and
decode is captured in a CUDA graph and replayed with new tables and lengths.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dsv3.backends.interface import MLAInputs, MLAWeights
from dsv3.backends.reference import ReferenceBackend

from dsv3.conformance.paged import block_tables, paged_batch
from tests.run_helpers import check_ran, run_python

#: relative Frobenius error allowed against the reference backend (fp32 math), per op and cache dtype.
TOLERANCES = {
    ("decode", torch.float32): 1e-5,
    ("prefill", torch.float32): 1e-5,
    ("decode", torch.bfloat16): 2e-2,   # q_latent, probabilities and the latent output rounded to BF16
    ("prefill", torch.bfloat16): 2e-2,  # per-head keys and values in BF16
}

DEEPSEEK = dict(nope=128, rank=512, rope=64, v=128)
TINY = dict(nope=32, rank=64, rope=16, v=32)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_weights(heads: int, dims: dict, device, generator) -> MLAWeights:
    scale = dims["rank"] ** -0.5
    return MLAWeights(
        w_uk=torch.randn(heads, dims["nope"], dims["rank"], device=device, generator=generator) * scale,
        w_uv=torch.randn(heads, dims["v"], dims["rank"], device=device, generator=generator) * scale)


def make_paged(seq_lens: list[int], query_lens: list[int], heads: int, block_size: int, dims: dict, dtype, device,
               seed=0, shared=None) -> dict:
    """Random new tokens, a random (never zero) pool and shuffled block tables for sequences that reach
    `seq_lens` with `query_lens` new tokens each."""
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    tables, num_blocks = block_tables(seq_lens, block_size, torch.Generator().manual_seed(seed), shared=shared)
    n = sum(query_lens)
    return dict(
        inputs=MLAInputs(rand(n, heads, dims["nope"]), rand(n, heads, dims["rope"]), rand(n, dims["rank"]),
                         rand(n, dims["rope"])),
        cache=rand(num_blocks, block_size, dims["rank"] + dims["rope"]),
        batch=paged_batch(tables, seq_lens, query_lens, device),
        weights=make_weights(heads, dims, device, g))


def make_decode(seq_lens: list[int], heads: int, block_size: int, dims: dict, dtype, device, seed=0, shared=None):
    return make_paged(seq_lens, [1] * len(seq_lens), heads, block_size, dims, dtype, device, seed, shared)


def make_chunk_rows(history: int, chunk: int, other: int, heads: int, block_size: int, dims: dict, dtype, device):
    """Sequence 0's prompt chunk of `chunk` tokens after `history` cached ones as decode rows that share its
    table (PagedBatch.shared_rows), then one decode of sequence 1 at position `other`; and the same tokens
    as an mla_prefill call (batch "as_prefill"), which must give the same outputs."""
    case = make_paged([history + chunk, other + 1], [chunk, 1], heads, block_size, dims, dtype, device, seed=4)
    prefill = case["batch"]
    positions = [history + i for i in range(chunk)] + [other]
    rows = paged_batch(prefill.block_tables[[0] * chunk + [1]], [p + 1 for p in positions], [1] * len(positions),
                       device)
    return {**case, "batch": replace(rows, shared_rows=True), "as_prefill": prefill}


def check_decode(mla, case: dict, tolerance: float, softmax_scale: float = 0.1, **kernel_options) -> None:
    ref_cache = case["cache"].clone()
    cache = case["cache"].clone()
    out = mla.mla_decode(case["inputs"], cache, case["batch"], case["weights"], softmax_scale, **kernel_options)
    ref = ReferenceBackend(cache.device).mla_decode(case["inputs"], ref_cache, case["batch"], case["weights"],
                                                   softmax_scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(cache, ref_cache), "the new token was not written to the cache as the reference writes it"
    error = relative_error(out, ref)
    assert error < tolerance, f"decode error {error:.2e} >= {tolerance:.0e} ({kernel_options})"


def check_fused_rope(mla, case: dict, tolerance: float = 0.0, **kernel_options) -> None:
    """Unrotated q_pe/k_pe with cos/sin (rope=...) against the rotary op first: the same cache bit for bit
    (the kernel rotates with the rotary kernel's own function and rounds as it does), and the same output
    within `tolerance` (0: bit for bit; compiled, the rotated query's register layout can change the order
    of the new token's fp32 score sum)."""
    from dsv3.backends.triton_kernels.elementwise import rotary

    inputs = case["inputs"]
    batch, half = inputs.k_pe.shape[0], inputs.k_pe.shape[-1] // 2
    device = inputs.k_pe.device
    angles = torch.rand(batch, half, device=device, generator=torch.Generator(device).manual_seed(5)) * 6.3
    cos, sin = angles.cos(), angles.sin()
    fused_cache, cache = case["cache"].clone(), case["cache"].clone()
    rotated = MLAInputs(inputs.q_nope, rotary(inputs.q_pe[:, None], cos[:, None], sin[:, None])[:, 0], inputs.latent,
                        rotary(inputs.k_pe[:, None], cos[:, None], sin[:, None])[:, 0])
    common = (case["batch"], case["weights"], 0.1)
    fused = mla.mla_decode(inputs, fused_cache, *common, rope=(cos, sin), **kernel_options)
    apart = mla.mla_decode(rotated, cache, *common, **kernel_options)
    assert torch.equal(fused_cache, cache), "the fused rotation wrote another rope key to the cache"
    assert torch.equal(fused, apart) if tolerance == 0 else relative_error(fused, apart) < tolerance
    assert not torch.equal(fused_cache, case["cache"])


def _emulated_decode_check() -> None:
    """Run inside a subprocess with TRITON_INTERPRET=1: tiny FP32 shapes through the real kernels."""
    from dsv3.backends.triton_kernels import mla

    tolerance = TOLERANCES[("decode", torch.float32)]
    # lengths 1, 16 (on a block boundary), 40 (the last of five blocks), 17 (one past two blocks it shares
    # with the 40-token sequence), 9: blocks of 8 shuffled over the pool, every table padded with zeros
    case = make_decode([1, 16, 40, 17, 9], heads=4, block_size=8, dims=TINY, dtype=torch.float32, device="cpu",
                       shared=(2, 3, 2))
    small_tiles = mla.DecodeConfig(block_h=16, block_n=8, num_warps=4, num_stages=1)
    cases = [  # splits <= FUSED_COMBINE_MAX_SPLITS combine and project in one kernel; more take the other path
        dict(),
        dict(config=small_tiles, num_splits=1),
        dict(config=small_tiles, num_splits=mla.FUSED_COMBINE_MAX_SPLITS),
        dict(config=small_tiles, num_splits=mla.FUSED_COMBINE_MAX_SPLITS + 1),
        dict(config=mla.DecodeConfig(block_h=2, block_n=16, num_warps=4, num_stages=1), num_splits=7),
    ]
    for options in cases:
        check_decode(mla, case, tolerance, **options)
    # a block size that is no power of two and smaller than a KV tile (a tile spans several blocks)
    odd = make_decode([1, 5, 6, 23], heads=3, block_size=5, dims=TINY, dtype=torch.float32, device="cpu", seed=3)
    check_decode(mla, odd, tolerance, config=small_tiles, num_splits=2)
    check_fused_rope(mla, case)
    check_fused_rope(mla, odd, config=small_tiles, num_splits=3)
    rows = make_chunk_rows(history=13, chunk=6, other=9, heads=4, block_size=8, dims=TINY, dtype=torch.float32,
                           device="cpu")
    for options in (dict(config=small_tiles, num_splits=1), dict(config=small_tiles, num_splits=3)):
        check_decode(mla, rows, tolerance, **options)
    check_rows_equal_prefill(mla, rows, tolerance, config=small_tiles, num_splits=2)
    print("emulated decode ok")


def check_rows_equal_prefill(mla, case: dict, tolerance: float, **kernel_options) -> None:
    """A chunk run as shared decode rows writes the cache and attends as the same chunk through mla_prefill."""
    rows_cache, prefill_cache = case["cache"].clone(), case["cache"].clone()
    out = mla.mla_decode(case["inputs"], rows_cache, case["batch"], case["weights"], 0.1, **kernel_options)
    ref = ReferenceBackend(rows_cache.device).mla_prefill(case["inputs"], prefill_cache, case["as_prefill"],
                                                         case["weights"], 0.1)
    assert torch.equal(rows_cache, prefill_cache)
    error = relative_error(out, ref)
    assert error < tolerance, f"rows against prefill: error {error:.2e}"


@pytest.mark.emulated
def test_decode_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    code = f"import runpy; runpy.run_path({__file__!r})['_emulated_decode_check']()"
    check_ran(run_python(code, interpret=True), "emulated decode ok")


def check_prefill(mla, case: dict, tolerance: float, softmax_scale: float = 0.1) -> None:
    ref_cache = case["cache"].clone()
    cache = case["cache"].clone()
    out = mla.mla_prefill(case["inputs"], cache, case["batch"], case["weights"], softmax_scale)
    ref = ReferenceBackend(cache.device).mla_prefill(case["inputs"], ref_cache, case["batch"], case["weights"],
                                                    softmax_scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(cache, ref_cache)
    error = relative_error(out, ref)
    assert error < tolerance, f"prefill error {error:.2e} >= {tolerance:.0e}"


def test_prepare_mla_splits_like_the_reference():
    pytest.importorskip("triton")
    from dsv3.backends.triton_kernels import mla

    kv_b = torch.randn(4 * (32 + 24), 64)
    ours = mla.prepare_mla(kv_b, 4, 32, 24, torch.bfloat16)
    ref = ReferenceBackend().prepare_mla(kv_b, 4, 32, 24, torch.bfloat16)
    assert ours.w_uk.dtype == ours.w_uv.dtype == torch.bfloat16
    assert torch.equal(ours.w_uk, ref.w_uk.to(torch.bfloat16)) and torch.equal(ours.w_uv, ref.w_uv.to(torch.bfloat16))


@pytest.mark.parametrize("heads", [16, 128])
def test_split_policy_spreads_one_sequence_and_keeps_splits_long(heads):
    """A batch of one sequence is split over the SMs (a long one fills them), no split is shorter than the
    config's minimum, and a full batch is not split at all."""
    pytest.importorskip("triton")
    from dsv3.backends.triton_kernels import mla

    config = mla.default_decode_config(heads, torch.bfloat16)
    sms, head_blocks = 132, -(-heads // config.block_h)
    for length in (64, 1024, 8192, 32768):
        splits = mla.choose_num_splits(1, heads, length, config, sms)
        assert splits >= 1 and -(-length // splits) >= min(length, config.min_split_tokens), (length, splits)
        assert splits * head_blocks <= config.programs_per_sm * sms
    long_one = mla.choose_num_splits(1, heads, 32768, config, sms)
    assert long_one * head_blocks >= sms, f"{long_one} splits x {head_blocks} head blocks leave SMs idle"
    assert mla.choose_num_splits(4 * sms, heads, 32768, config, sms) == 1


PREFILL_LAYOUTS = {  # name: (seq_lens, query_lens, shared)
    "whole prompts, equal lengths (plain causal)": ([12, 12], [12, 12], None),
    "whole prompts, mixed lengths": ([5, 16, 1], [5, 16, 1], None),
    "chunks starting mid-block and on a boundary": ([13, 16, 9], [6, 8, 9], None),
    "a prefix of two shared blocks, the rest new": ([20, 17], [20, 1], (0, 1, 2)),
}


@pytest.mark.parametrize("layout", PREFILL_LAYOUTS)
def test_prefill_on_cpu(layout):
    pytest.importorskip("triton")
    from dsv3.backends.triton_kernels import mla

    seq_lens, query_lens, shared = PREFILL_LAYOUTS[layout]
    case = make_paged(seq_lens, query_lens, heads=4, block_size=8, dims=TINY, dtype=torch.float32, device="cpu",
                      shared=shared)
    check_prefill(mla, case, TOLERANCES[("prefill", torch.float32)])


def test_prefill_refuses_a_table_too_narrow_for_max_seq_len():
    pytest.importorskip("triton")
    from dsv3.backends.errors import BackendError
    from dsv3.backends.triton_kernels import mla

    case = make_paged([8], [8], heads=2, block_size=8, dims=TINY, dtype=torch.float32, device="cpu")
    batch = case["batch"]
    too_long = type(batch)(batch.block_tables, batch.seq_lens, batch.query_start, 8, 100)
    with pytest.raises(BackendError, match="max_seq_len 100"):
        mla.mla_prefill(case["inputs"], case["cache"], too_long, case["weights"], 0.1)


# ---- NVIDIA GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch,lengths,block_size", [
    (1, "one", 64), (1, "32k", 64), (3, "mixed32k", 64), (256, "one", 64), (256, "mixed", 64), (64, "mixed", 16),
])
def test_decode_matches_reference(heads, batch, lengths, block_size):
    from dsv3.backends.triton_kernels import mla

    max_seq = 32768 if "32k" in lengths else 2048
    g = torch.Generator().manual_seed(batch * heads)
    if lengths == "one":
        seq_lens = [1] * batch
    elif lengths == "32k":
        seq_lens = [max_seq] * batch
    else:
        seq_lens = torch.randint(1, max_seq + 1, (batch,), generator=g).tolist()
        seq_lens[0], seq_lens[-1] = max_seq, 1
    case = make_decode(seq_lens, heads, block_size, DEEPSEEK, torch.bfloat16, "cuda", seed=batch + heads)
    check_decode(mla, case, TOLERANCES[("decode", torch.bfloat16)], softmax_scale=192 ** -0.5)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("history,chunk", [(0, 64), (4032, 64), (3000, 128)])
def test_prompt_chunk_as_decode_rows_on_the_gpu(heads, history, chunk):
    """Many programs run at once on the GPU: rows that read tokens of the rows before them must find them
    written (shared_rows), which the interpreter, running programs one by one, cannot show."""
    from dsv3.backends.triton_kernels import mla

    rows = make_chunk_rows(history, chunk, 777, heads, 64, DEEPSEEK, torch.bfloat16, "cuda")
    check_decode(mla, rows, TOLERANCES[("decode", torch.bfloat16)], softmax_scale=192 ** -0.5)
    check_rows_equal_prefill(mla, rows, TOLERANCES[("decode", torch.bfloat16)])


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 128])
def test_decode_with_rope_in_the_kernel(heads):
    from dsv3.backends.triton_kernels import mla

    # fp32 (IEEE dots): a different summation order shows as ~1e-7, where BF16 could flip a rounding
    case = make_decode([1, 2, 64, 65, 66, 1001, 4095, 4096], heads, 64, DEEPSEEK, torch.float32, "cuda", seed=heads,
                       shared=(7, 6, 15))
    check_fused_rope(mla, case, tolerance=1e-6)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_any_split_count(num_splits):
    from dsv3.backends.triton_kernels import mla

    case = make_decode([1, 2, 64, 65, 66, 1001, 4095, 4096], 16, 64, DEEPSEEK, torch.bfloat16, "cuda",
                       seed=num_splits, shared=(7, 6, 15))
    check_decode(mla, case, TOLERANCES[("decode", torch.bfloat16)], softmax_scale=192 ** -0.5, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.cuda
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new tables, lengths and queries: the same result as eager calls."""
    from dsv3.backends.triton_kernels import mla

    heads, max_seq = 16, 8192
    cases = [make_decode(lens, heads, 64, DEEPSEEK, torch.bfloat16, "cuda", seed=seed) for seed, lens in
             enumerate([[6, 101, 4001, max_seq], [1, 2, 3, 4], [max_seq, 7001, 65, 2]])]
    pool = max(c["cache"].shape[0] for c in cases)  # every case's tables index into one pool
    width = max(c["batch"].block_tables.shape[1] for c in cases)
    cache = torch.randn(pool, 64, DEEPSEEK["rank"] + DEEPSEEK["rope"], device="cuda").to(torch.bfloat16)
    tables = torch.zeros(4, width, dtype=torch.int32, device="cuda")
    seq_lens = torch.zeros(4, dtype=torch.int32, device="cuda")
    batch = type(cases[0]["batch"])(tables, seq_lens, cases[0]["batch"].query_start, 1, max_seq)
    static = MLAInputs(*(torch.empty_like(t) for t in (cases[0]["inputs"].q_nope, cases[0]["inputs"].q_pe,
                                                        cases[0]["inputs"].latent, cases[0]["inputs"].k_pe)))
    weights = cases[0]["weights"]

    def load(case):
        inputs = case["inputs"]
        for mine, theirs in zip((static.q_nope, static.q_pe, static.latent, static.k_pe),
                                (inputs.q_nope, inputs.q_pe, inputs.latent, inputs.k_pe), strict=True):
            mine.copy_(theirs)
        tables.zero_()[:, :case["batch"].block_tables.shape[1]].copy_(case["batch"].block_tables)
        seq_lens.copy_(case["batch"].seq_lens)

    def step():
        return mla.mla_decode(static, cache, batch, weights, 0.07)

    load(cases[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels and convert the weights outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = step()
    for case in cases[1:]:
        load(case)
        eager_cache = cache.clone()
        graph.replay()
        eager = mla.mla_decode(static, eager_cache, batch, weights, 0.07)
        torch.cuda.synchronize()
        assert torch.equal(cache, eager_cache)
        error = relative_error(captured_out, eager)
        assert error < 1e-3, f"graph replay differs from an eager call by {error:.1e}"


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads,seq_lens,query_lens", [
    (16, [1], [1]), (16, [300, 300], [300, 300]), (128, [1064, 1064], [64, 64]), (16, [32768], [8]),
    (128, [2048], [2048]), (128, [700, 64, 129, 1], [700, 1, 65, 1]),
])
def test_prefill_matches_reference(heads, seq_lens, query_lens):
    from dsv3.backends.triton_kernels import mla

    case = make_paged(seq_lens, query_lens, heads, 64, DEEPSEEK, torch.bfloat16, "cuda", seed=heads + len(seq_lens))
    check_prefill(mla, case, TOLERANCES[("prefill", torch.bfloat16)], softmax_scale=192 ** -0.5)
