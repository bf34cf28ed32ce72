"""The Triton MLA kernels (backends/triton_kernels/mla.py) against the reference backend.

On the CPU the decode kernel runs under the Triton interpreter (TRITON_INTERPRET=1,
set in a subprocess before triton is imported) on FP32 inputs, since the
interpreter's BF16 dot is not faithful. On an NVIDIA GPU decode and prefill run
in BF16 on random inputs, per-sequence lengths from 1 to 32k, batch 1 and 256,
and decode is captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import pytest
import torch
from dsv3.backends.interface import MLAWeights
from dsv3.backends.reference import ReferenceBackend

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


def make_decode_inputs(batch: int, heads: int, max_batch: int, max_seq: int, dims: dict, dtype, device, seed=0):
    """Random queries, new latents, a random (never zero) cache and distinct cache rows."""
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    return dict(
        q_nope=rand(batch, heads, dims["nope"]), q_pe=rand(batch, heads, dims["rope"]),
        latent=rand(batch, dims["rank"]), k_pe=rand(batch, dims["rope"]),
        cache=rand(max_batch, max_seq, dims["rank"] + dims["rope"]),
        slots=torch.randperm(max_batch, device=device, generator=g)[:batch],
        weights=make_weights(heads, dims, device, g))


def check_decode(mla, inputs: dict, positions: torch.Tensor, tolerance: float, softmax_scale: float = 0.1,
                 **kernel_options) -> None:
    ref_cache = inputs["cache"].clone()
    cache = inputs["cache"].clone()
    args = (inputs["q_nope"], inputs["q_pe"], inputs["latent"], inputs["k_pe"])
    out = mla.mla_decode(*args, cache, inputs["slots"], positions, inputs["weights"], softmax_scale,
                         **kernel_options)
    ref = ReferenceBackend(cache.device).mla_decode(*args, ref_cache, inputs["slots"], positions,
                                                   inputs["weights"], softmax_scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(cache, ref_cache), "the new token was not written to the cache as the reference writes it"
    error = relative_error(out, ref)
    assert error < tolerance, f"decode error {error:.2e} >= {tolerance:.0e} ({kernel_options})"


def check_fused_rope(mla, inputs: dict, positions: torch.Tensor, tolerance: float = 0.0, **kernel_options) -> None:
    """Unrotated q_pe/k_pe with cos/sin (rope=...) against the rotary op first: the same cache bit for bit
    (the kernel rotates with the rotary kernel's own function and rounds as it does), and the same output
    within `tolerance` (0: bit for bit; compiled, the rotated query's register layout can change the order
    of the new token's fp32 score sum)."""
    from dsv3.backends.triton_kernels.elementwise import rotary

    batch, half = positions.shape[0], inputs["k_pe"].shape[-1] // 2
    g = torch.Generator(positions.device).manual_seed(5)
    angles = torch.rand(batch, half, device=positions.device, generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    fused_cache, cache = inputs["cache"].clone(), inputs["cache"].clone()
    q_pe = rotary(inputs["q_pe"][:, None], cos[:, None], sin[:, None])[:, 0]
    k_pe = rotary(inputs["k_pe"][:, None], cos[:, None], sin[:, None])[:, 0]
    common = (inputs["slots"], positions, inputs["weights"], 0.1)
    fused = mla.mla_decode(inputs["q_nope"], inputs["q_pe"], inputs["latent"], inputs["k_pe"], fused_cache, *common,
                           rope=(cos, sin), **kernel_options)
    apart = mla.mla_decode(inputs["q_nope"], q_pe, inputs["latent"], k_pe, cache, *common, **kernel_options)
    assert torch.equal(fused_cache, cache), "the fused rotation wrote another rope key to the cache"
    assert torch.equal(fused, apart) if tolerance == 0 else relative_error(fused, apart) < tolerance
    assert not torch.equal(fused_cache, inputs["cache"])


def _emulated_decode_check() -> None:
    """Run inside a subprocess with TRITON_INTERPRET=1: tiny FP32 shapes through the real kernels."""
    from dsv3.backends.triton_kernels import mla

    tolerance = TOLERANCES[("decode", torch.float32)]
    inputs = make_decode_inputs(batch=3, heads=4, max_batch=5, max_seq=40, dims=TINY, dtype=torch.float32,
                                device="cpu")
    positions = torch.tensor([0, 17, 39])  # lengths 1, 18, 40 (the whole cache)
    small_tiles = mla.DecodeConfig(block_h=16, block_n=8, num_warps=4, num_stages=1)
    cases = [  # splits <= FUSED_COMBINE_MAX_SPLITS combine and project in one kernel; more take the other path
        dict(),
        dict(config=small_tiles, num_splits=1),
        dict(config=small_tiles, num_splits=mla.FUSED_COMBINE_MAX_SPLITS),
        dict(config=small_tiles, num_splits=mla.FUSED_COMBINE_MAX_SPLITS + 1),
        dict(config=mla.DecodeConfig(block_h=2, block_n=16, num_warps=4, num_stages=1), num_splits=7),
    ]
    for options in cases:
        check_decode(mla, inputs, positions, tolerance, **options)
    check_fused_rope(mla, inputs, positions)
    check_fused_rope(mla, inputs, positions, config=small_tiles, num_splits=3)
    print("emulated decode ok")


@pytest.mark.emulated
def test_decode_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    code = f"import runpy; runpy.run_path({__file__!r})['_emulated_decode_check']()"
    check_ran(run_python(code, interpret=True), "emulated decode ok")


def make_prefill_inputs(batch: int, length: int, heads: int, max_seq: int, dims: dict, dtype, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    return dict(
        q_nope=rand(batch, length, heads, dims["nope"]), q_pe=rand(batch, length, heads, dims["rope"]),
        latent=rand(batch, length, dims["rank"]), k_pe=rand(batch, length, dims["rope"]),
        cache=rand(batch + 1, max_seq, dims["rank"] + dims["rope"]),
        slots=torch.randperm(batch + 1, device=device, generator=g)[:batch],
        weights=make_weights(heads, dims, device, g))


def check_prefill(mla, inputs: dict, start_pos: int, tolerance: float, softmax_scale: float = 0.1) -> None:
    ref_cache = inputs["cache"].clone()
    cache = inputs["cache"].clone()
    args = (inputs["q_nope"], inputs["q_pe"], inputs["latent"], inputs["k_pe"])
    out = mla.mla_prefill(*args, cache, inputs["slots"], start_pos, inputs["weights"], softmax_scale)
    ref = ReferenceBackend(cache.device).mla_prefill(*args, ref_cache, inputs["slots"], start_pos,
                                                    inputs["weights"], softmax_scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(cache, ref_cache)
    error = relative_error(out, ref)
    assert error < tolerance, f"prefill error {error:.2e} >= {tolerance:.0e} (start_pos {start_pos})"


def test_prepare_mla_splits_like_the_reference():
    pytest.importorskip("triton")
    from dsv3.backends.triton_kernels import mla

    kv_b = torch.randn(4 * (32 + 24), 64)
    ours = mla.prepare_mla(kv_b, 4, 32, 24, torch.bfloat16)
    ref = ReferenceBackend().prepare_mla(kv_b, 4, 32, 24, torch.bfloat16)
    assert ours.w_uk.dtype == ours.w_uv.dtype == torch.bfloat16
    assert torch.equal(ours.w_uk, ref.w_uk.to(torch.bfloat16)) and torch.equal(ours.w_uv, ref.w_uv.to(torch.bfloat16))


@pytest.mark.parametrize("start_pos", [0, 7])
def test_prefill_on_cpu(start_pos):
    pytest.importorskip("triton")
    from dsv3.backends.triton_kernels import mla

    inputs = make_prefill_inputs(batch=2, length=5, heads=4, max_seq=16, dims=TINY, dtype=torch.float32,
                                 device="cpu")
    check_prefill(mla, inputs, start_pos, TOLERANCES[("prefill", torch.float32)])


# ---- NVIDIA GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch,lengths", [
    (1, "one"), (1, "32k"), (3, "mixed32k"), (256, "one"), (256, "mixed"),
])
def test_decode_matches_reference(heads, batch, lengths):
    from dsv3.backends.triton_kernels import mla

    max_seq = 32768 if "32k" in lengths else 2048
    g = torch.Generator("cuda").manual_seed(batch * heads)
    if lengths == "one":
        positions = torch.zeros(batch, dtype=torch.long, device="cuda")
    elif lengths == "32k":
        positions = torch.full((batch,), max_seq - 1, device="cuda")
    else:
        positions = torch.randint(0, max_seq, (batch,), device="cuda", generator=g)
        positions[0], positions[-1] = max_seq - 1, 0
    inputs = make_decode_inputs(batch, heads, max_batch=batch + 3, max_seq=max_seq, dims=DEEPSEEK,
                                dtype=torch.bfloat16, device="cuda", seed=batch + heads)
    check_decode(mla, inputs, positions, TOLERANCES[("decode", torch.bfloat16)], softmax_scale=192 ** -0.5)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 128])
def test_decode_with_rope_in_the_kernel(heads):
    from dsv3.backends.triton_kernels import mla

    # fp32 (IEEE dots): a different summation order shows as ~1e-7, where BF16 could flip a rounding
    inputs = make_decode_inputs(8, heads, max_batch=9, max_seq=4096, dims=DEEPSEEK, dtype=torch.float32,
                                device="cuda", seed=heads)
    check_fused_rope(mla, inputs, torch.tensor([0, 1, 63, 64, 65, 1000, 4094, 4095], device="cuda"),
                     tolerance=1e-6)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_any_split_count(num_splits):
    from dsv3.backends.triton_kernels import mla

    inputs = make_decode_inputs(8, 16, max_batch=8, max_seq=4096, dims=DEEPSEEK, dtype=torch.bfloat16,
                                device="cuda", seed=num_splits)
    positions = torch.tensor([0, 1, 63, 64, 65, 1000, 4094, 4095], device="cuda")
    check_decode(mla, inputs, positions, TOLERANCES[("decode", torch.bfloat16)], softmax_scale=192 ** -0.5,
                 num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.cuda
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new positions and queries: the same result as eager calls."""
    from dsv3.backends.triton_kernels import mla

    batch, heads, max_seq = 4, 16, 8192
    inputs = make_decode_inputs(batch, heads, batch, max_seq, DEEPSEEK, torch.bfloat16, "cuda", seed=1)
    static = {k: inputs[k].clone() for k in ("q_nope", "q_pe", "latent", "k_pe")}
    positions = torch.tensor([5, 100, 4000, 8191], device="cuda")
    cache = inputs["cache"].clone()

    def step():
        return mla.mla_decode(static["q_nope"], static["q_pe"], static["latent"], static["k_pe"], cache,
                              inputs["slots"], positions, inputs["weights"], 0.07)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile the kernels and convert the weights outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = step()
    for seed, new_positions in [(2, [0, 1, 2, 3]), (3, [8191, 7000, 64, 1])]:
        fresh = make_decode_inputs(batch, heads, batch, max_seq, DEEPSEEK, torch.bfloat16, "cuda", seed=seed)
        for k in static:
            static[k].copy_(fresh[k])
        positions.copy_(torch.tensor(new_positions))
        eager_cache = cache.clone()
        graph.replay()
        eager = mla.mla_decode(static["q_nope"], static["q_pe"], static["latent"], static["k_pe"], eager_cache,
                               inputs["slots"], positions, inputs["weights"], 0.07)
        torch.cuda.synchronize()
        assert torch.equal(cache, eager_cache)
        error = relative_error(captured_out, eager)
        assert error < 1e-3, f"graph replay differs from an eager call by {error:.1e}"


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("heads,batch,length,start_pos", [
    (16, 1, 1, 0), (16, 2, 300, 0), (128, 2, 64, 1000), (16, 1, 8, 32760), (128, 1, 2048, 0),
])
def test_prefill_matches_reference(heads, batch, length, start_pos):
    from dsv3.backends.triton_kernels import mla

    max_seq = 32768 if start_pos + length > 4096 else 4096
    inputs = make_prefill_inputs(batch, length, heads, max_seq, DEEPSEEK, torch.bfloat16, "cuda",
                                 seed=heads + length)
    check_prefill(mla, inputs, start_pos, TOLERANCES[("prefill", torch.bfloat16)], softmax_scale=192 ** -0.5)
