"""The CPU emulation of torch_npu ops (tests/npu_emulation) against hand-built cases of their documented behaviour.

Every expected value here is computed another way than the emulation computes it (complex numbers for the
rope, explicit loops and masks for attention, worked examples for routing), so a wrong reading of the
docs in the emulation shows up. All of it is emulated: nothing runs on an NPU.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.ascend, pytest.mark.emulated]



def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- norms, rope, activation --------------------------------------------------------------------------

def test_rms_norm_follows_the_formula(npu):
    x = torch.randn(3, 5, 8, generator=g(0)).bfloat16()
    gamma = (torch.rand(8, generator=g(1)) + 0.5).bfloat16()
    y, rstd = npu.npu_rms_norm(x, gamma, epsilon=1e-5)
    xd = x.double()
    expected = xd / (xd.pow(2).sum(-1, keepdim=True) / 8 + 1e-5).sqrt() * gamma.double()
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (3, 5, 1)
    torch.testing.assert_close(y.double(), expected, atol=2e-2, rtol=1e-2)
    expected_rstd = 1 / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(rstd.double(), expected_rstd, atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_what_the_docs_exclude(npu):
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(npu.EmulationError, match="gamma dtype"):
        npu.npu_rms_norm(x, torch.ones(8))  # gamma must share self's dtype
    with pytest.raises(npu.EmulationError, match="2-8-D"):
        npu.npu_rms_norm(torch.randn(8).bfloat16(), torch.ones(8).bfloat16())


def test_add_rms_norm_returns_the_normed_sum_and_the_sum(npu):
    x1, x2 = torch.randn(6, 16, generator=g(2)).bfloat16(), torch.randn(6, 16, generator=g(3)).bfloat16()
    gamma = torch.rand(16, generator=g(4)).bfloat16()
    y, rstd, summed = npu.npu_add_rms_norm(x1, x2, gamma, 1e-6)
    assert torch.equal(summed, x1 + x2)
    torch.testing.assert_close(y, npu.npu_rms_norm(x1 + x2, gamma, 1e-6)[0], atol=0, rtol=0)


def _complex_rotate(pairs_real, pairs_imag, angle):
    rotated = torch.complex(pairs_real, pairs_imag) * torch.polar(torch.ones_like(angle), angle)
    return rotated.real, rotated.imag


def test_rotary_mul_interleave_rotates_adjacent_pairs(npu):
    b, s, n, d = 2, 3, 4, 8
    x = torch.randn(b, s, n, d, dtype=torch.float64, generator=g(5))
    angle = torch.rand(s, d // 2, dtype=torch.float64, generator=g(6)) * 6
    r1 = angle.cos().repeat_interleave(2, dim=-1).view(1, s, 1, d)   # 1S1D: x is BSND
    r2 = angle.sin().repeat_interleave(2, dim=-1).view(1, s, 1, d)
    out = npu.npu_rotary_mul(x.float(), r1.float(), r2.float(), rotary_mode="interleave").double()
    real, imag = _complex_rotate(x[..., 0::2], x[..., 1::2], angle[None, :, None, :])
    torch.testing.assert_close(out[..., 0::2], real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., 1::2], imag, atol=1e-5, rtol=1e-5)


def test_rotary_mul_half_rotates_the_two_halves(npu):
    x = torch.randn(1, 2, 5, 8, generator=g(7))                       # BNSD with r1 11SD
    angle = torch.rand(5, 4, generator=g(8)) * 6
    r1 = angle.cos().repeat(1, 2).view(1, 1, 5, 8)
    r2 = angle.sin().repeat(1, 2).view(1, 1, 5, 8)
    out = npu.npu_rotary_mul(x, r1, r2)
    real, imag = _complex_rotate(x[..., :4].double(), x[..., 4:].double(), angle.double())
    torch.testing.assert_close(out[..., :4].double(), real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., 4:].double(), imag, atol=1e-5, rtol=1e-5)


def test_rotary_mul_interleave_limits(npu):
    x = torch.randn(2, 3, 4, 8)
    per_batch = torch.ones(2, 3, 1, 8)                                 # BS1D is not an interleave layout
    with pytest.raises(npu.EmulationError, match="not 11SD, 1S1D or S11D"):
        npu.npu_rotary_mul(x, per_batch, per_batch, rotary_mode="interleave")
    wide = torch.randn(1, 2, 1000, 8)                                  # B * N = 1000
    table = torch.ones(1, 2, 1, 8)
    with pytest.raises(npu.EmulationError, match="B \\* N must be < 1000"):
        npu.npu_rotary_mul(wide, table, table, rotary_mode="interleave")
    with pytest.raises(npu.EmulationError, match="share a float16/bfloat16/float32 dtype"):
        npu.npu_rotary_mul(x, torch.ones(1, 3, 1, 8, dtype=torch.float64), torch.ones(1, 3, 1, 8),
                           rotary_mode="interleave")


def test_swiglu_is_silu_of_the_first_half_times_the_second(npu):
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0]])
    expected = torch.tensor([[1 / (1 + math.exp(-1)) * 3.0, -2 / (1 + math.exp(2)) * 0.5],
                             [0.0, 4 / (1 + math.exp(-4)) * 2.0]])
    torch.testing.assert_close(npu.npu_swiglu(x), expected)
    torch.testing.assert_close(npu.npu_swiglu(x.T.contiguous(), dim=0), expected.T)


# ---- MoE routing --------------------------------------------------------------------------------------

def _gating(npu, logits, bias, mode=1, k=8):
    return npu.npu_moe_gating_top_k(logits, k, bias=bias, k_group=4, group_count=8, group_select_mode=mode,
                                    renorm=0, norm_type=1, out_flag=False, routed_scaling_factor=2.5, eps=1e-20)


def test_gating_ranks_groups_by_the_sum_of_their_top_two(npu):
    logits = torch.full((1, 256), -10.0)
    logits[0, 5] = 10.0                       # group 0: one expert near 1, the rest near 0 -> top-2 sum ~1.0
    moderate = [32 * grp + j for grp in (1, 2, 3, 4) for j in (0, 1)]
    logits[0, moderate] = 2.0                 # groups 1-4: two experts at 0.88 each -> top-2 sum ~1.76
    y, idx, _ = _gating(npu, logits, torch.zeros(256))
    assert idx.dtype == torch.int32 and sorted(idx[0].tolist()) == moderate   # group 0 lost despite the best expert
    torch.testing.assert_close(y, torch.full((1, 8), 2.5 / 8))               # equal scores, normalized, scaled
    _, idx_max, _ = _gating(npu, logits, torch.zeros(256), mode=0)
    assert 5 in idx_max[0].tolist()           # ranked by the group maximum, group 0 stays


def test_gating_bias_selects_without_weighing(npu):
    logits = torch.full((1, 256), -10.0)
    logits[0, :8] = 1.0                       # group 0 holds eight equal experts
    bias = torch.zeros(256)
    bias[40] = 5.0                            # group 1's expert 40 has a tiny score but a large bias
    y, idx, norm_out = _gating(npu, logits, bias)
    chosen = idx[0].tolist()
    assert 40 in chosen and len(set(chosen) & set(range(8))) == 7
    scores = torch.sigmoid(logits[0, idx[0].long()])   # weights come from the unbiased scores
    torch.testing.assert_close(y[0], scores / scores.sum() * 2.5)
    torch.testing.assert_close(norm_out, torch.sigmoid(logits))


def test_gating_a2_a3_limits(npu):
    with pytest.raises(npu.EmulationError, match="only 256 experts"):
        npu.npu_moe_gating_top_k(torch.randn(2, 128), 8, bias=torch.zeros(128), k_group=4, group_count=8, norm_type=1)
    with pytest.raises(npu.EmulationError, match="k_group must be 4"):
        npu.npu_moe_gating_top_k(torch.randn(2, 256), 8, bias=torch.zeros(256), k_group=2, group_count=8, norm_type=1)
    with pytest.raises(npu.EmulationError, match="bias must not be None"):
        npu.npu_moe_gating_top_k(torch.randn(2, 256), 8, k_group=4, group_count=8, norm_type=1)
    with pytest.raises(npu.EmulationError, match="groups of more than 2"):
        npu.npu_moe_gating_top_k(torch.randn(2, 256), 8, bias=torch.zeros(256), k_group=4, group_count=128)


def _route(npu, x, ids, **overrides):
    options = dict(active_num=ids.numel(), expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True,
                   active_expert_range=[0, 3], quant_mode=-1)
    options.update(overrides)
    return npu.npu_moe_init_routing_v2(x, ids, **options)


def test_init_routing_v2_worked_example(npu):
    x = torch.tensor([[10.0], [20.0], [30.0]])
    ids = torch.tensor([[2, 0], [1, 2], [0, 1]], dtype=torch.int32)   # pairs f = n*K + k: experts 2,0,1,2,0,1
    expanded_x, row_idx, counts, _ = _route(npu, x, ids)
    # by expert: 0 <- pairs 1 (token 0), 4 (token 2); 1 <- 2 (token 1), 5 (token 2); 2 <- 0 (token 0), 3 (token 1)
    assert expanded_x[:, 0].tolist() == [10.0, 30.0, 20.0, 30.0, 10.0, 20.0]
    assert row_idx.dtype == torch.int32 and row_idx.tolist() == [4, 0, 2, 5, 1, 3]   # pair f -> its row
    assert counts.dtype == torch.int64 and counts.tolist() == [2, 2, 2]
    _, scatter_idx, _, _ = _route(npu, x, ids, row_idx_type=1)
    assert scatter_idx.tolist() == [1, 4, 2, 5, 0, 3]                                # row -> its pair
    assert torch.equal(expanded_x[row_idx.long()].view(3, 2), x[[0, 0, 1, 1, 2, 2]].view(3, 2))


def test_init_routing_v2_active_expert_range_drops_pairs(npu):
    x = torch.tensor([[10.0], [20.0], [30.0]])
    ids = torch.tensor([[2, 0], [1, 2], [0, 1]], dtype=torch.int32)
    expanded_x, row_idx, counts, _ = _route(npu, x, ids, active_expert_range=[1, 3])
    assert counts.tolist() == [2, 2]
    assert row_idx.tolist() == [2, -1, 0, 3, -1, 1]
    assert expanded_x[:4, 0].tolist() == [20.0, 30.0, 10.0, 20.0]


def test_init_routing_v2_limits(npu):
    x = torch.randn(3, 4)
    with pytest.raises(npu.EmulationError, match="must be int32"):
        _route(npu, x, torch.tensor([[2, 0], [1, 2], [0, 1]]))
    with pytest.raises(npu.EmulationError, match="expert_tokens_num_type must be 1 or 2"):
        _route(npu, x, torch.zeros(3, 2, dtype=torch.int32), expert_tokens_num_type=0)
    with pytest.raises(npu.EmulationError, match="expert id out of range"):
        _route(npu, x, torch.full((3, 2), 3, dtype=torch.int32))


def test_grouped_matmul_counts_and_cumsum(npu):
    x = torch.randn(7, 5, generator=g(9))
    weight = torch.randn(3, 5, 4, generator=g(10))
    expected = torch.cat([x[0:2] @ weight[0], x[2:2] @ weight[1], x[2:7] @ weight[2]])
    counts = npu.npu_grouped_matmul([x], [weight], group_list=torch.tensor([2, 0, 5]), group_list_type=1,
                                    group_type=0, split_item=2)[0]
    cumsum = npu.npu_grouped_matmul([x], [weight], group_list=torch.tensor([2, 2, 7]), group_list_type=0,
                                    group_type=0, split_item=3)[0]
    torch.testing.assert_close(counts, expected)
    torch.testing.assert_close(cumsum, expected)
    transposed = weight.transpose(1, 2).contiguous().transpose(1, 2)   # a transposed view is accepted
    torch.testing.assert_close(npu.npu_grouped_matmul([x], [transposed], group_list=torch.tensor([2, 0, 5]),
                                                      group_list_type=1, group_type=0, split_item=2)[0], expected)
    with pytest.raises(npu.EmulationError, match="covers 6 rows, x has 7"):
        npu.npu_grouped_matmul([x], [weight], group_list=torch.tensor([2, 0, 4]), group_list_type=1, group_type=0,
                               split_item=2)
    with pytest.raises(npu.EmulationError, match="1-D int64"):
        npu.npu_grouped_matmul([x], [weight], group_list=torch.tensor([2, 0, 5], dtype=torch.int32),
                               group_list_type=1, group_type=0, split_item=2)


# ---- attention ----------------------------------------------------------------------------------------

def _expected_attention(q, q_rope, k, k_rope, allowed, scale):
    """Plain attention for one sequence: q [S, N, D], k [T, D] (one shared head), allowed[i][j] python bools."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for n in range(q.shape[1]):
        for i in range(q.shape[0]):
            keys = [j for j in range(k.shape[0]) if allowed(i, j)]
            if not keys:
                continue
            full_q = torch.cat((q[i, n], q_rope[i, n])).double()
            full_k = torch.cat((k[keys], k_rope[keys]), dim=-1).double()
            probs = torch.softmax(full_k @ full_q * scale, dim=0)
            out[i, n] = probs @ k[keys].double()
    return out


def _paged(sequences, block_size, num_pages, seed):
    """Scatter sequences [T_b, W] into shuffled pages; returns (pages [P, block, W], block_table int32)."""
    width = sequences[0].shape[-1]
    pages = torch.zeros(num_pages, block_size, width, dtype=sequences[0].dtype)
    order = torch.randperm(num_pages, generator=g(seed)).tolist()
    per_seq = num_pages // len(sequences)
    table = torch.tensor([order[b * per_seq:(b + 1) * per_seq] for b in range(len(sequences))], dtype=torch.int32)
    for b, seq in enumerate(sequences):
        for start in range(0, seq.shape[0], block_size):
            chunk = seq[start:start + block_size]
            pages[table[b, start // block_size], :chunk.shape[0]] = chunk
    return pages, table


def test_fused_attention_decode_reads_pages_in_block_table_order(npu):
    heads, kv_lens, scale = 32, [130, 5], 0.05
    latent = [torch.randn(n, 512, generator=g(11 + n)).bfloat16() for n in kv_lens]
    rope = [torch.randn(n, 64, generator=g(21 + n)).bfloat16() for n in kv_lens]
    key, table = _paged(latent, 128, 4, seed=0)
    key_rope, table_rope = _paged(rope, 128, 4, seed=0)
    assert torch.equal(table, table_rope)
    q = torch.randn(2, 1, heads, 512, generator=g(31)).bfloat16()
    q_rope = torch.randn(2, 1, heads, 64, generator=g(32)).bfloat16()
    out, _ = npu.npu_fused_infer_attention_score(
        q, key, key, query_rope=q_rope, key_rope=key_rope, num_heads=heads, num_key_value_heads=1,
        input_layout="BSND", scale=scale, sparse_mode=0, block_table=table, block_size=128,
        actual_seq_lengths_kv=kv_lens)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for b in range(2):
        expected = _expected_attention(q[b], q_rope[b], latent[b], rope[b], lambda i, j: True, scale)
        torch.testing.assert_close(out[b].double(), expected, atol=2e-2, rtol=2e-2)


def _decode_call(npu, heads=32, block_size=128, **overrides):
    pages = torch.zeros(2, block_size, 512).bfloat16()
    args = dict(query_rope=torch.zeros(1, 1, heads, 64).bfloat16(), key_rope=torch.zeros(2, block_size, 64).bfloat16(),
                num_heads=heads, num_key_value_heads=1, input_layout="BSND", scale=1.0, sparse_mode=0,
                block_table=torch.tensor([[0, 1]], dtype=torch.int32), block_size=block_size,
                actual_seq_lengths_kv=[3])
    args.update(overrides)
    query = args.pop("query", torch.zeros(1, 1, heads, 512).bfloat16())
    return npu.npu_fused_infer_attention_score(query, pages, pages, **args)


def test_fused_attention_mla_limits(npu):
    with pytest.raises(npu.EmulationError, match="N 32, 64 or 128"):
        _decode_call(npu, heads=16, query_rope=torch.zeros(1, 1, 16, 64).bfloat16())     # the caller must pad heads
    with pytest.raises(npu.EmulationError, match="block_size 16 or 128"):
        _decode_call(npu, block_size=64)
    with pytest.raises(npu.EmulationError, match="must be contiguous"):
        _decode_call(npu, query=torch.zeros(1, 1, 32, 1024).bfloat16()[..., ::2])
    with pytest.raises(npu.EmulationError, match="needs actual_seq_lengths_kv"):
        _decode_call(npu, actual_seq_lengths_kv=None)
    with pytest.raises(NotImplementedError):
        _decode_call(npu, query_rope=None, key_rope=None)


def _band_call(npu, q, q_rope, key, key_rope, table, q_len, kv_len, mask, pre_tokens=2**31 - 1, scale=0.05):
    return npu.npu_fused_infer_attention_score(
        q, key, key, query_rope=q_rope, key_rope=key_rope, num_heads=q.shape[2], num_key_value_heads=1,
        input_layout="BSND", scale=scale, sparse_mode=4, atten_mask=mask, pre_tokens=pre_tokens, next_tokens=0,
        block_table=table, block_size=128, actual_seq_lengths=[q_len], actual_seq_lengths_kv=[kv_len])[0]


def test_fused_attention_band_mode_is_causal_from_the_bottom_right(npu):
    q_len, kv_len, scale = 3, 7, 0.05                 # 4 tokens already cached, 3 new ones last
    latent = torch.randn(kv_len, 512, generator=g(41)).bfloat16()
    rope = torch.randn(kv_len, 64, generator=g(42)).bfloat16()
    key, table = _paged([latent], 128, 2, seed=1)
    key_rope, _ = _paged([rope], 128, 2, seed=1)
    q = torch.randn(1, q_len, 128, 512, generator=g(43)).bfloat16()
    q_rope = torch.randn(1, q_len, 128, 64, generator=g(44)).bfloat16()
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    out = _band_call(npu, q, q_rope, key, key_rope, table, q_len, kv_len, mask)
    causal = _expected_attention(q[0], q_rope[0], latent, rope, lambda i, j: j <= i + kv_len - q_len, scale)
    torch.testing.assert_close(out[0].double(), causal, atol=2e-2, rtol=2e-2)
    window = _band_call(npu, q, q_rope, key, key_rope, table, q_len, kv_len, mask, pre_tokens=1)
    band = _expected_attention(q[0], q_rope[0], latent, rope,
                               lambda i, j: i + kv_len - q_len - 1 <= j <= i + kv_len - q_len, scale)
    torch.testing.assert_close(window[0].double(), band, atol=2e-2, rtol=2e-2)
    with pytest.raises(npu.EmulationError, match="lower-triangular"):
        _band_call(npu, q, q_rope, key, key_rope, table, q_len, kv_len, ~mask)
    with pytest.raises(npu.EmulationError, match="N must be 128"):
        _band_call(npu, q[:, :, :64].contiguous(), q_rope[:, :, :64].contiguous(), key, key_rope, table, q_len,
                   kv_len, mask)


def test_fused_attention_without_band_mode_takes_at_most_16_queries(npu):
    with pytest.raises(npu.EmulationError, match="Q_S 1-16"):
        _decode_call(npu, query=torch.zeros(1, 17, 32, 512).bfloat16(),
                     query_rope=torch.zeros(1, 17, 32, 64).bfloat16(), sparse_mode=3)


def test_fused_attention_pages_shared_by_two_sequences_and_right_padded_queries(npu):
    """Two sequences share their first page (a cached prefix), blocks of 64 in band mode with queries of 2 and
    5 right-padded to 5: each batch is causal from its own bottom-right corner, padding rows come back zero."""
    prefix = torch.randn(64, 576, generator=g(51)).bfloat16()
    tails = [torch.randn(n, 576, generator=g(52 + n)).bfloat16() for n in (10, 40)]
    sequences = [torch.cat((prefix, tail)) for tail in tails]                  # 74 and 104 tokens
    pages = torch.zeros(5, 64, 576).bfloat16()
    table = torch.tensor([[3, 0], [3, 4]], dtype=torch.int32)                  # page 3 in both tables
    pages[3], pages[0, :10], pages[4, :40] = prefix, tails[0], tails[1]
    key, key_rope = pages[..., :512].contiguous(), pages[..., 512:].contiguous()
    q_lens, kv_lens, scale = [2, 5], [74, 104], 0.05
    q = torch.randn(2, 5, 128, 512, generator=g(61)).bfloat16()
    q_rope = torch.randn(2, 5, 128, 64, generator=g(62)).bfloat16()
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    out = npu.npu_fused_infer_attention_score(
        q, key, key, query_rope=q_rope, key_rope=key_rope, num_heads=128, num_key_value_heads=1,
        input_layout="BSND", scale=scale, sparse_mode=4, atten_mask=mask, pre_tokens=2**31 - 1, next_tokens=0,
        block_table=table, block_size=64, actual_seq_lengths=q_lens, actual_seq_lengths_kv=kv_lens)[0]
    for b in range(2):
        seq, q_len, kv_len = sequences[b], q_lens[b], kv_lens[b]
        expected = _expected_attention(q[b, :q_len], q_rope[b, :q_len], seq[:, :512], seq[:, 512:],
                                       lambda i, j, q_len=q_len, kv_len=kv_len: j <= i + kv_len - q_len, scale)
        torch.testing.assert_close(out[b, :q_len].double(), expected, atol=2e-2, rtol=2e-2)
        assert (out[b, q_len:] == 0).all()


def test_fused_attention_pool_must_hold_every_batchs_pages(npu):
    with pytest.raises(npu.EmulationError, match="blocknum 2 is less than the 4 pages"):
        _decode_call(npu, query=torch.zeros(2, 1, 32, 512).bfloat16(), query_rope=torch.zeros(2, 1, 32, 64).bfloat16(),
                     block_table=torch.tensor([[0, 1], [0, 1]], dtype=torch.int32), actual_seq_lengths_kv=[200, 200])


def test_device_queries_describe_one_910b(npu):
    assert npu.npu.get_device_name(0) == "Ascend910B2" and npu.npu.device_count() == 1
    assert npu.npu.get_device_properties(0).total_memory == 64 << 30
