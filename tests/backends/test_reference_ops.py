"""The reference backend's ops against independent computations: FP8 block math in float64,
e4m3fnuz emulation, routing against transformers' routers, small ops, absorbed MLA, MTP loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.interface import MLAInputs, RoutingConfig
from dsv3.backends.reference import ReferenceBackend
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

import dsv3
from dsv3.conformance.paged import block_tables, concat, paged_batch, take_rows

FN_MAX, FNUZ_MAX = 448.0, 240.0


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_gemm_float64(q_act, act_scale, q_weight, weight_scale) -> torch.Tensor:
    """y[m, n] = sum over 128-wide K blocks b of (sum_k qa[m, k] qw[n, k]) * sa[m, b] * sw[n // 128, b], in float64."""
    m, k = q_act.shape
    n = q_weight.shape[0]
    out = torch.zeros(m, n, dtype=torch.float64)
    for b in range(math.ceil(k / 128)):
        cols = slice(128 * b, min(k, 128 * (b + 1)))
        partial = q_act[:, cols].double() @ q_weight[:, cols].double().T
        row_scale = weight_scale[torch.arange(n) // 128, b].double()
        out += partial * act_scale[:, b, None].double() * row_scale[None, :]
    return out


def quantize_activation_independently(x, dtype=torch.float8_e4m3fn, max_value=FN_MAX, power_of_two=False):
    """Per token per 128 channels: s = max(amax, 1e-4) / max_value (optionally 2^ceil(log2 s)), q = dtype(x / s)."""
    m, k = x.shape
    scales = torch.empty(m, math.ceil(k / 128), dtype=torch.float64)
    q = torch.empty(m, k, dtype=dtype)
    for b in range(scales.shape[1]):
        cols = slice(128 * b, min(k, 128 * (b + 1)))
        s = x[:, cols].double().abs().amax(dim=1).clamp_min(1e-4) / max_value
        if power_of_two:
            s = 2.0 ** torch.ceil(torch.log2(s))
        scales[:, b] = s
        q[:, cols] = (x[:, cols].double() / s[:, None]).clamp(-max_value, max_value).to(dtype)
    return q, scales


# ---- FP8 block quantization ----------------------------------------------------------------------

def test_weight_scales_cover_partial_blocks():
    """kv_a_proj_with_mqa of V3: 576 rows -> 5 scale rows; K = 7168 -> 56 columns; and a K of 200 -> 2."""
    for (rows, cols), expected in (((576, 7168), (5, 56)), ((576, 200), (5, 2)), ((130, 128), (2, 1))):
        q, scale = fp8.quantize_blocks(torch.randn(rows, cols, generator=generator()))
        assert q.dtype == torch.float8_e4m3fn and q.shape == (rows, cols) and scale.shape == expected


def test_quantize_and_dequantize_blocks_against_a_loop():
    weight = torch.randn(300, 200, generator=generator(1)) * torch.linspace(0.01, 10, 200)
    q, scale = fp8.quantize_blocks(weight)
    for rb in range(3):
        for cb in range(2):
            block = weight[128 * rb: 128 * (rb + 1), 128 * cb: 128 * (cb + 1)]
            assert torch.isclose(scale[rb, cb], block.abs().max() / FN_MAX, rtol=1e-6)
            q_block = q[128 * rb: 128 * (rb + 1), 128 * cb: 128 * (cb + 1)].float()
            assert q_block.abs().max() == FN_MAX  # each block's amax maps to 448
    restored = fp8.dequantize_blocks(q, scale, torch.float64)
    expected = q.double() * scale.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.allclose(restored, expected, rtol=2.0 ** -23, atol=0)  # the product is taken in float32
    # e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 for normal values (subnormals: half a step)
    error = (restored - weight.double()).abs()
    step = scale.double().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200] * 2.0 ** -10
    assert (error <= weight.double().abs() * 2.0 ** -4 + step).all()


@pytest.mark.parametrize("m, n, k", [(5, 576, 320), (3, 256, 128), (4, 130, 200)])
def test_fp8_gemm_equals_the_block_formula_in_float64(m, n, k):
    weight = torch.randn(n, k, generator=generator(2)) / k ** 0.5
    q_weight, weight_scale = fp8.quantize_blocks(weight)
    x = torch.randn(m, k, generator=generator(3)) * torch.logspace(-2, 2, m)[:, None]
    backend = ReferenceBackend()
    y = backend.linear(x, backend.prepare_linear(q_weight, weight_scale, "fp8"))
    q_act, act_scale = quantize_activation_independently(x)
    expected = block_gemm_float64(q_act, act_scale, q_weight, weight_scale)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert float((y.double() - expected).norm() / expected.norm()) <= 1e-6


def test_all_zero_blocks_give_no_nan():
    """An all-zero activation block and an all-zero weight block: s = max(0, 1e-4) / 448, never 0/0."""
    weight = torch.randn(256, 384, generator=generator(4))
    weight[:128, 128:256] = 0
    x = torch.randn(3, 384, generator=generator(5))
    x[1] = 0
    x[2, :128] = 0
    q_weight, weight_scale = fp8.quantize_blocks(weight)
    assert torch.isfinite(weight_scale).all() and (weight_scale > 0).all()
    backend = ReferenceBackend()
    y = backend.linear(x, backend.prepare_linear(q_weight, weight_scale, "fp8"))
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    q_act, act_scale = fp8.quantize_activation(torch.zeros(2, 128))
    assert not q_act.float().isnan().any() and torch.allclose(act_scale, torch.full_like(act_scale, 1e-4 / FN_MAX))


def test_ue8m0_scales_are_powers_of_two():
    x = torch.randn(6, 300, generator=generator(6)) * torch.logspace(-3, 3, 6)[:, None]
    q, scale = fp8.quantize_activation(x, power_of_two=True)
    exponent = torch.log2(scale.double())
    assert torch.equal(exponent, exponent.round())
    q_ref, scale_ref = quantize_activation_independently(x, power_of_two=True)
    assert torch.equal(scale.double(), scale_ref)
    assert torch.equal(q.float(), q_ref.float())
    assert q.float().abs().max() <= FN_MAX  # rounding the scale up never overflows
    # the backend with ue8m0 uses them in its GEMM
    weight = torch.randn(64, 300, generator=generator(7))
    q_weight, weight_scale = fp8.quantize_blocks(weight)
    backend = ReferenceBackend(ue8m0=True)
    y = backend.linear(x, backend.prepare_linear(q_weight, weight_scale, "fp8"))
    expected = block_gemm_float64(q_ref, scale_ref, q_weight, weight_scale)
    assert float((y.double() - expected).norm() / expected.norm()) <= 1e-6


# ---- e4m3fnuz (MI300X numerics), emulated ---------------------------------------------------------

def test_fn_to_fnuz_keeps_every_value():
    """All 256 e4m3fn bit patterns: 0x80 (-0) becomes +0, scales double, dequantized values are equal."""
    bits = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    weight = bits.view(torch.float8_e4m3fn).reshape(16, 16)
    scale = torch.tensor([[0.75]])
    converted, new_scale = fp8.fn_to_fnuz(weight, scale)
    assert converted.dtype == torch.float8_e4m3fnuz and torch.equal(new_scale, scale * 2)
    converted_bits = converted.view(torch.uint8).flatten()
    assert converted_bits[0x80] == 0 and not converted.float().isnan().flatten()[0x80]
    finite = ~weight.float().isnan()  # 0x7F and 0xFF are NaN in e4m3fn
    before = fp8.dequantize_blocks(weight, scale, torch.float64)
    after = fp8.dequantize_blocks(converted, new_scale, torch.float64)
    assert torch.equal(before[finite], after[finite])
    with pytest.raises(TypeError):
        fp8.fn_to_fnuz(converted, new_scale)


def test_fnuz_backend_emulates_mi300x_numerics():
    """Weights converted from the fn checkpoint, activations quantized to fnuz with max 224."""
    weight = torch.randn(192, 256, generator=generator(8)) / 16
    q_weight, weight_scale = fp8.quantize_blocks(weight)
    backend = ReferenceBackend(fp8_format="e4m3fnuz")
    assert backend.capabilities.fp8_dtype == torch.float8_e4m3fnuz and backend.capabilities.fp8_max == 224.0
    prepared = backend.prepare_linear(q_weight, weight_scale, "fp8")
    assert prepared.weight.dtype == torch.float8_e4m3fnuz and torch.equal(prepared.scale, weight_scale * 2)
    x = torch.randn(4, 256, generator=generator(9))
    q_act, act_scale = quantize_activation_independently(x, torch.float8_e4m3fnuz, 224.0)
    expected = block_gemm_float64(q_act, act_scale, prepared.weight, prepared.scale)
    y = backend.linear(x, prepared)
    assert float((y.double() - expected).norm() / expected.norm()) <= 1e-6
    fn = ReferenceBackend()
    y_fn = fn.linear(x, fn.prepare_linear(q_weight, weight_scale, "fp8"))
    assert float((y - y_fn).norm() / y_fn.norm()) < 0.05  # two roundings of the same product
    # with no max given, quantize_activation takes the format's activation max from the FP8 table too
    default_q, default_scale = fp8.quantize_activation(x, torch.float8_e4m3fnuz)
    q_224, scale_224 = fp8.quantize_activation(x, torch.float8_e4m3fnuz, 224.0)
    assert torch.equal(default_scale, scale_224) and torch.equal(default_q.view(torch.uint8), q_224.view(torch.uint8))


# ---- routing against transformers' routers ------------------------------------------------------

def sorted_by_expert(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(-1, order), ids.gather(-1, order)


def assert_same_routing(ours, theirs):
    w, i = sorted_by_expert(*ours)
    w_ref, i_ref = sorted_by_expert(*theirs)
    assert torch.equal(i, i_ref)
    assert torch.allclose(w, w_ref.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_topk_prob, top_k, topk_group", [(True, 4, 2), (False, 3, 3), (True, 1, 1)])
def test_v3_noaux_tc_routing_matches_transformers(norm_topk_prob, top_k, topk_group):
    config = DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=top_k, n_group=4,
                              topk_group=topk_group, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=generator(10)) / 4)
        router.e_score_correction_bias.copy_(torch.randn(16, generator=generator(11)) * 0.3)
    x = torch.randn(64, 32, generator=generator(12))
    _, weights, ids = router(x)
    routing = RoutingConfig("sigmoid", "noaux_tc", top_k, 4, topk_group, norm_topk_prob, 2.5)
    ours = ReferenceBackend().moe_route(x, router.weight.detach(), router.e_score_correction_bias, routing)
    assert_same_routing(ours, (weights, ids))
    # the bias changes the choice for some tokens but never enters the weights
    unbiased = ReferenceBackend().moe_route(x, router.weight.detach(), None, routing)
    assert not torch.equal(sorted_by_expert(*unbiased)[1], sorted_by_expert(*ours)[1])
    scores = (x @ router.weight.detach().T).sigmoid()
    chosen = scores.gather(1, ours[1])
    if norm_topk_prob:
        chosen = chosen / chosen.sum(-1, keepdim=True)
    assert torch.allclose(ours[0], chosen * 2.5, rtol=1e-6)


@pytest.mark.parametrize("method, n_group, topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_v2_softmax_routing_matches_transformers(method, n_group, topk_group):
    config = DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=n_group,
                              topk_group=topk_group, topk_method=method, routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=generator(13)) / 4)
    x = torch.randn(64, 32, generator=generator(14))
    _, weights, ids = router(x)
    routing = RoutingConfig("softmax", method, 3, n_group, topk_group, False, 16.0)
    assert_same_routing(ReferenceBackend().moe_route(x, router.weight.detach(), None, routing), (weights, ids))


def test_group_limit_restricts_the_choice():
    """With topk_group=1 every chosen expert of a token lies in one group."""
    routing = RoutingConfig("sigmoid", "noaux_tc", 3, 4, 1, True, 1.0)
    x, gate = torch.randn(50, 16, generator=generator(15)), torch.randn(16, 16, generator=generator(16))
    _, ids = ReferenceBackend().moe_route(x, gate, torch.zeros(16), routing)
    assert ((ids // 4) == (ids[:, :1] // 4)).all()


# ---- small ops, MoE experts and absorbed MLA against plain formulas --------------------------------

def test_rms_norm_and_fused_residual():
    backend = ReferenceBackend()
    x, residual = torch.randn(3, 5, 64, generator=generator(17)), torch.randn(3, 5, 64, generator=generator(18))
    weight = torch.rand(64, generator=generator(19)) + 0.5
    expected = weight * (x + residual) / ((x + residual).pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    out = backend.rms_norm(x, weight, 1e-6, residual)
    assert torch.allclose(out.values, expected, atol=1e-5) and torch.equal(out.residual, x + residual)
    alone = backend.rms_norm(x + residual, weight, 1e-6)
    assert torch.allclose(alone.values, expected, atol=1e-5) and alone.quantized is None


def test_rotary_is_complex_multiplication_of_adjacent_pairs():
    backend = ReferenceBackend()
    x = torch.randn(2, 7, 3, 16, generator=generator(20))
    angles = torch.rand(2, 7, 8, generator=generator(21)) * 10
    out = backend.rotary(x, angles.cos(), angles.sin())
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 7, 3, 8, 2).contiguous())
                                  * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_moe_experts_against_a_per_token_loop():
    backend = ReferenceBackend()
    num_experts, d, inter = 6, 16, 8
    gate_up = torch.randn(num_experts, 2 * inter, d, generator=generator(22))
    down = torch.randn(num_experts, d, inter, generator=generator(23))
    x = torch.randn(10, d, generator=generator(24))
    ids = torch.stack([torch.randperm(num_experts, generator=generator(25 + n))[:2] for n in range(10)])
    weights = torch.rand(10, 2, generator=generator(40))
    out = backend.moe_experts(x, weights, ids, backend.prepare_experts(gate_up, None, down, None, "fp32"))
    expected = torch.zeros_like(x)
    for n in range(10):
        for j in range(2):
            g, u = (gate_up[ids[n, j]] @ x[n]).chunk(2)
            expected[n] += weights[n, j] * (down[ids[n, j]] @ (F.silu(g) * u))
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def _mla_tokens(n: int, heads: int, nope: int, rope: int, rank: int, seed: int) -> MLAInputs:
    g = generator(seed)
    return MLAInputs(torch.randn(n, heads, nope, generator=g), torch.randn(n, heads, rope, generator=g),
                     torch.randn(n, rank, generator=g), torch.randn(n, rope, generator=g))


def test_absorbed_mla_prefill_equals_attention_over_expanded_keys_and_values():
    """The paged latent-cache attention equals plain attention with per-head K/V from kv_b_proj, each
    sequence on its own (shuffled blocks, lengths 5 and 7 over blocks of 3), and writes through the tables."""
    backend = ReferenceBackend()
    heads, nope, rope, v_dim, rank, block_size, lengths = 3, 8, 4, 6, 10, 3, [5, 7]
    kv_b = torch.randn(heads * (nope + v_dim), rank, generator=generator(41))
    weights = backend.prepare_mla(kv_b, heads, nope, v_dim, torch.float32)
    inputs = _mla_tokens(sum(lengths), heads, nope, rope, rank, 42)
    tables, num_blocks = block_tables(lengths, block_size, generator(43))
    cache = backend.allocate_mla_cache(backend.mla_cache_spec(num_blocks, block_size, rank, rope, torch.float32))
    out = backend.mla_prefill(inputs, cache, paged_batch(tables, lengths, lengths), weights, 0.3)
    assert out.shape == (sum(lengths), heads, v_dim)
    start = 0
    for seq, t in enumerate(lengths):
        rows = slice(start, start + t)
        latent, k_pe = inputs.latent[rows], inputs.k_pe[rows]
        kv = (latent @ kv_b.T).view(t, heads, nope + v_dim)
        keys = torch.cat((kv[..., :nope], k_pe[:, None].expand(t, heads, rope)), -1)
        queries = torch.cat((inputs.q_nope[rows], inputs.q_pe[rows]), -1)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * 0.3
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        expected = torch.einsum("hqk,khv->qhv", scores.softmax(-1), kv[..., nope:])
        assert torch.allclose(out[rows], expected, atol=1e-5)
        written = cache[tables[seq].long()].flatten(0, 1)[:t]
        assert torch.equal(written, torch.cat((latent, k_pe), -1))
        start += t
    assert (cache[0] == 0).all()  # the scratch block is in no table


def test_paged_mla_chunks_shared_prefix_and_decode_match_one_prefill():
    """Prefill in two chunks (the second starting mid-block), a second sequence reusing the first's full
    blocks as its prefix, then decode: the same outputs as one whole prefill of each sequence."""
    backend = ReferenceBackend()
    heads, nope, rope, v_dim, rank, block_size = 2, 4, 4, 4, 8, 4
    weights = backend.prepare_mla(torch.randn(heads * (nope + v_dim), rank, generator=generator(50)),
                                  heads, nope, v_dim, torch.float32)
    prefix = _mla_tokens(8, heads, nope, rope, rank, 51)  # two full blocks shared by both sequences
    tails = [_mla_tokens(n, heads, nope, rope, rank, 52 + n) for n in (5, 2)]
    whole = [concat([prefix, tail]) for tail in tails]  # 13 and 10 tokens
    lengths = [13, 10]
    expected = [backend.mla_prefill(w, backend.allocate_mla_cache(backend.mla_cache_spec(8, block_size, rank, rope,
                                                                                         torch.float32)),
                                    paged_batch(torch.arange(1, 5, dtype=torch.int32)[None], [n], [n]), weights, 0.3)
                for w, n in zip(whole, lengths, strict=True)]

    tables, num_blocks = block_tables(lengths, block_size, generator(56), shared=(0, 1, 2))
    cache = backend.allocate_mla_cache(backend.mla_cache_spec(num_blocks, block_size, rank, rope, torch.float32))
    first = backend.mla_prefill(take_rows(whole[0], slice(0, 6)), cache, paged_batch(tables[:1], [6], [6]),
                                weights, 0.3)
    # sequence 0 goes on from position 6; sequence 1 starts after its cached 8-token prefix
    second = backend.mla_prefill(concat([take_rows(whole[0], slice(6, 12)), take_rows(whole[1], slice(8, 9))]),
                                 cache, paged_batch(tables, [12, 9], [6, 1]), weights, 0.3)
    last = concat([take_rows(w, slice(n - 1, n)) for w, n in zip(whole, lengths, strict=True)])
    decode = backend.mla_decode(last, cache, paged_batch(tables, lengths, [1, 1]), weights, 0.3)
    assert torch.allclose(torch.cat((first, second[:6])), expected[0][:12], atol=1e-5)
    assert torch.allclose(second[6], expected[1][8], atol=1e-5)
    assert torch.allclose(decode, torch.stack((expected[0][12], expected[1][9])), atol=1e-5)


# ---- MTP ---------------------------------------------------------------------------------------

def test_mtp_module_loads_only_when_asked():
    with_mtp = dsv3.load_model("tiny", backend="reference", precision="fp32", max_seq_len=32, load_mtp=True,
                               quiet=True)
    tokens = torch.randint(0, with_mtp.config.vocab_size, (2, 9), generator=generator(46))
    logits = with_mtp.transformer.mtp_logits(tokens[:, :-1], tokens[:, 1:])
    assert logits.shape == (2, 8, with_mtp.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    without = dsv3.load_model("tiny", backend="reference", precision="fp32", max_seq_len=32, quiet=True)
    assert not without.transformer.mtp
    assert torch.allclose(without.logits(tokens), with_mtp.logits(tokens))
    with pytest.raises(dsv3.Dsv3Error, match="load_mtp=True"):
        without.transformer.mtp_logits(tokens[:, :-1], tokens[:, 1:])
