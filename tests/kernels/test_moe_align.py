"""The MoE alignment kernel (`align_by_expert`, backends/triton_kernels/moe.py) against its torch
specification (`align_by_expert_reference`): bit for bit, sorted pairs and tile experts.

Routings: random experts (repeats within a token), distinct top-k per token, every expert used (all of
them in one token where E <= k), one expert for all, pairs marked -1 (skipped: some, all); N from 2 to
1000 tokens, 8 to 256 experts, tiles of 16 and 64 rows; both paths of the kernel (one launch up to
ALIGN_CHUNK pairs, count + place above, with its edges); the rows a tile of a real expert holds are exactly
the pairs not marked -1. And the whole moe_experts output with the kernel's alignment against the reference one's.

On the CPU the kernel runs under TRITON_INTERPRET=1, set in a subprocess before triton is imported;
on an NVIDIA GPU the same checks run compiled, up to 16384 tokens, and in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from tests.run_helpers import check_ran, run_python

pytest.importorskip("triton")

#: (experts, top_k): the tiny test model's scale, V2-Lite, DeepSeek-V3
SHAPES = ((8, 8), (64, 6), (256, 8))


def routing(pattern: str, tokens: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """[tokens, top_k] int64 expert ids."""
    if pattern == "random":  # repeats within a token too
        return torch.randint(0, num_experts, (tokens, top_k), generator=generator)
    if pattern == "top_k":  # distinct experts per token, as the router picks them
        return torch.rand(tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices
    if pattern == "every_expert":  # pair i to expert i % E: all used, all in one token where E <= k
        return (torch.arange(tokens * top_k) % num_experts).view(tokens, top_k)
    if pattern == "one_expert":  # the last one: every tile after its run is past the end
        return torch.full((tokens, top_k), num_experts - 1)
    if pattern == "skip":  # top-k with 3 in 4 pairs marked -1 (other ranks' experts): token 0 all, token 1 none
        ids = routing("top_k", tokens, num_experts, top_k, generator)
        skipped = torch.rand(tokens, top_k, generator=generator) < 0.75
        skipped[0], skipped[1] = True, False
        return ids.masked_fill(skipped, -1)
    if pattern == "all_skipped":
        return torch.full((tokens, top_k), -1)
    raise ValueError(pattern)


def check(ids: torch.Tensor, num_experts: int, block_m: int, case: str) -> None:
    from dsv3.backends.triton_kernels import moe

    pairs, tile_expert = moe.align_by_expert(ids, num_experts, block_m)
    expected_pairs, expected_tiles = moe.align_by_expert_reference(ids.cpu(), num_experts, block_m)
    assert pairs.dtype == tile_expert.dtype == torch.int32, case
    assert pairs.shape == expected_pairs.shape and tile_expert.shape == expected_tiles.shape, case
    assert torch.equal(pairs.cpu(), expected_pairs), f"{case}: sorted pairs\n{pairs}\n!=\n{expected_pairs}"
    assert torch.equal(tile_expert.cpu(), expected_tiles), f"{case}: tile experts\n{tile_expert}\n!=\n{expected_tiles}"
    check_rows_run(ids.cpu(), expected_pairs, expected_tiles, num_experts, block_m, case)


def check_rows_run(ids, pairs, tile_expert, num_experts: int, block_m: int, case: str) -> None:
    """The rows the grouped GEMM runs (tiles of a real expert) hold every pair of an expert in [0, E) once, in
    its expert's tiles, and no pair marked -1; and there are only as many tiles as those pairs need."""
    flat = ids.flatten()
    runs = (tile_expert < num_experts).repeat_interleave(block_m)
    held = pairs[runs & (pairs < flat.numel())].long()
    assert sorted(held.tolist()) == (flat >= 0).nonzero().flatten().tolist(), f"{case}: pairs in the GEMM's rows"
    assert torch.equal(flat[held], tile_expert.repeat_interleave(block_m)[runs & (pairs < flat.numel())].long()), case
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts)
    assert int(runs.sum()) == int(((counts + block_m - 1) // block_m * block_m).sum()), f"{case}: rows run"


def check_all(device: str, token_counts: tuple[int, ...] = (2, 3, 64, 1000)) -> None:
    """Every case on one device; run in-process on a GPU, in the interpreter's subprocess on the CPU."""
    from dsv3.backends.triton_kernels.moe import ALIGN_CHUNK

    g = torch.Generator().manual_seed(0)
    for num_experts, top_k in SHAPES:
        for tokens in token_counts:
            patterns = (("random", "top_k", "every_expert", "one_expert", "skip", "all_skipped") if tokens < 1000
                        else ("random", "one_expert", "skip"))
            for pattern in patterns:
                ids = routing(pattern, tokens, num_experts, top_k, g).to(device)
                for block_m in (16, 64):
                    check(ids, num_experts, block_m, f"{pattern}, N={tokens}, E={num_experts}, k={top_k}, {block_m}")

    # the one-launch path's limit and one pair past it (a last chunk of one pair); fewer pairs than
    # experts; one choice per token; tiles of 2 and 32 rows; a strided view of the ids
    num_experts, top_k = SHAPES[-1]
    for pairs in (ALIGN_CHUNK, ALIGN_CHUNK + 1):
        ids = torch.randint(0, num_experts, (pairs,), generator=g).view(pairs, 1).to(device)
        check(ids, num_experts, 16, f"{pairs} pairs")
    check(torch.tensor([[200, 3, 200], [7, 200, 3]], device=device), num_experts, 64, "6 pairs of 256 experts")
    wide = routing("random", 40, num_experts, 2 * top_k, g).to(device)
    for block_m in (2, 32):
        check(wide[:, ::2], num_experts, block_m, f"strided ids, {block_m}")


def check_moe_experts(device: str) -> None:
    """moe_experts with the kernel's alignment equals moe_experts with the reference's: on the CPU bit for
    bit (the interpreter adds in a fixed order), on a GPU up to the order of the atomic combine."""
    from dsv3.backends.reference import ReferenceBackend
    from dsv3.backends.triton_kernels import moe
    from dsv3.backends.triton_kernels.configs import PORTABLE

    from tests.numerics import row_error

    g = torch.Generator().manual_seed(1)
    num_experts, hidden, inter, top_k = 8, 256, 128, 2
    ref = ReferenceBackend()
    experts = ref.prepare_experts(torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5, None,
                                  torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5, None, "fp8")
    args = [t.to(device) for t in (experts.gate_up, experts.gate_up_scale, experts.down, experts.down_scale)]
    for tokens, pattern in ((2, "top_k"), (40, "top_k"), (40, "skip"), (3, "all_skipped")):
        ids = routing(pattern, tokens, num_experts, top_k, g).to(device)
        weights = (torch.rand(tokens, top_k, generator=g) + 0.1).to(device)
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
        got = moe.moe_experts(x, weights, ids, *args, PORTABLE, quant=(448.0, False))
        kernel = moe.align_by_expert
        moe.align_by_expert = moe.align_by_expert_reference
        try:
            expected = moe.moe_experts(x, weights, ids, *args, PORTABLE, quant=(448.0, False))
        finally:
            moe.align_by_expert = kernel
        if device == "cpu":
            assert torch.equal(got, expected), (tokens, pattern)
        else:
            assert row_error(got.float().cpu(), expected.float().cpu()) <= 1e-2, (tokens, pattern)
        assert not got[(ids < 0).all(-1)].any(), f"{pattern}: a token whose pairs are all skipped must get 0"


@pytest.mark.emulated
def test_align_under_triton_interpreter():
    code = (f"import runpy; checks = runpy.run_path({__file__!r}); checks['check_all']('cpu'); "
            "checks['check_moe_experts']('cpu'); print('align ok')")
    check_ran(run_python(code, interpret=True), "align ok")


# ---- NVIDIA GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.cuda
def test_align_on_gpu():
    check_all("cuda", token_counts=(2, 3, 64, 128, 129, 1000, 4096, 16384))
    check_moe_experts("cuda")


@pytest.mark.gpu
@pytest.mark.cuda
def test_align_cuda_graph_replay():
    """Captured once at each path's size, replayed with new ids: the reference's alignment of the new ids."""
    from dsv3.backends.triton_kernels import moe

    num_experts, top_k = SHAPES[-1]
    g = torch.Generator().manual_seed(2)
    for tokens, block_m in ((16, 16), (2048, 64)):
        ids = routing("top_k", tokens, num_experts, top_k, g).cuda()
        moe.align_by_expert(ids, num_experts, block_m)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pairs, tile_expert = moe.align_by_expert(ids, num_experts, block_m)
        for pattern in ("top_k", "random", "one_expert", "skip"):
            ids.copy_(routing(pattern, tokens, num_experts, top_k, g))
            graph.replay()
            expected_pairs, expected_tiles = moe.align_by_expert_reference(ids.cpu(), num_experts, block_m)
            assert torch.equal(pairs.cpu(), expected_pairs) and torch.equal(tile_expert.cpu(), expected_tiles), pattern
