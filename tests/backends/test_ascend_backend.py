"""The Ascend backend on the CPU emulation of torch_npu, op by op and end to end, against the reference backend.

Everything here is emulated (tests/npu_emulation stands in for torch_npu): it shows the backend calls the
documented ops within their documented limits and gets the reference's numbers from them; it says nothing
about a real 910B. Each op runs fused and plain (the bisect switch), and the emulation's call counter
shows which path ran.
"""

from __future__ import annotations

import sys

import pytest
import torch
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import OPS, MLAInputs, RoutingConfig
from dsv3.backends.platforms import describe_chip
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.registry import create_backend

from dsv3.checkpoint import RandomSource, save_checkpoint
from dsv3.config import load_config
from dsv3.conformance.paged import block_tables, paged_batch
from dsv3.serving.params import SamplingParams

pytestmark = [pytest.mark.ascend, pytest.mark.emulated]

ASCEND_910B = describe_chip("huawei", "ascend910b", name="Ascend910B2")
ASCEND_950 = describe_chip("huawei", "ascend950", name="Ascend950PR")
FUSED_OPS = {  # fused path -> the torch_npu ops it calls
    "rms_norm": ("npu_rms_norm", "npu_add_rms_norm"),
    "rope": ("npu_rotary_mul",),
    "attention": ("npu_fused_infer_attention_score",),
    "moe_gating": ("npu_moe_gating_top_k",),
    "moe_experts": ("npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu"),
}


@pytest.fixture
def calls(npu):
    npu.CALLS.clear()
    return npu.CALLS


def ascend(fused: bool = True, chip=ASCEND_910B):
    from dsv3.backends.ascend import AscendBackend

    return AscendBackend(device="cpu", chip=chip, use_fused=fused)


def ran(calls, path: str) -> bool:
    return any(calls[op] for op in FUSED_OPS[path])


def assert_close_bf16(actual, expected, scale_tol=2e-2):
    """Within a bf16-sized error of the reference, relative to the reference's magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= scale_tol * max(expected.float().abs().max().item(), 1.0), f"max error {error}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- construction and settings ------------------------------------------------------------------------

def test_capabilities_on_910b(npu):
    caps = ascend().capabilities
    assert (caps.name, caps.device, caps.dist_backend) == ("ascend", "cpu", "hccl")
    assert caps.fp8_dtype is None and not caps.native_fp8 and not caps.has_fp8
    assert set(OPS) <= set(caps.ops)
    assert caps.ops["mla_decode"].startswith("torch_npu.npu_fused_infer_attention_score")
    assert "emulated" in caps.ops["moe_experts"]                  # the emulation is named in what runs
    assert not ascend().supports("linear_fp8", "fp8") and ascend().supports("linear_bf16", "bf16")


@pytest.mark.parametrize("path", ["rms_norm", "rope", "attention", "moe_gating", "moe_experts"])
def test_capabilities_follow_each_fused_path(npu, path):
    """Capabilities.ops is written from NPU_OPS, the table whose paths and limits the dispatch checks: a path
    switched off turns exactly its ops to the reference's code."""
    from dsv3.backends.ascend import NPU_OPS

    fused, plain = ascend().capabilities.ops, ascend(fused={path: False}).capabilities.ops
    reference = ReferenceBackend().capabilities.ops
    for op, (op_path, impl) in NPU_OPS.items():
        assert fused[op].startswith(f"{impl.name} where {impl.when}; else {reference[op]} (plain)"), op
        assert plain[op] == (f"{reference[op]} (plain)" if op_path == path else fused[op]), op


def test_capabilities_on_950_have_fp8(npu):
    caps = ascend(chip=ASCEND_950).capabilities
    assert caps.fp8_dtype == torch.float8_e4m3fn and caps.native_fp8 and caps.fp8_max == 448.0


def test_chip_is_probed_from_torch_npu(npu):
    from dsv3.backends.ascend import AscendBackend

    backend = AscendBackend(device="cpu")                          # asks the (emulated) torch_npu.npu
    assert (backend.chip.arch, backend.chip.name, backend.chip.memory_bytes) == ("ascend910b", "Ascend910B2", 64 << 30)


def test_registry_builds_it_and_rejects_other_chips(npu):
    backend = create_backend("ascend", device="cpu", chip=ASCEND_910B)
    assert backend.capabilities.name == "ascend"
    with pytest.raises(BackendError, match="not a Huawei Ascend chip"):
        create_backend("ascend", device="cpu", chip=describe_chip("nvidia", "sm_90"))


def test_without_torch_npu_the_error_says_what_to_install(npu, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)           # `import torch_npu` now fails
    with pytest.raises(BackendError, match=r"needs torch_npu and Huawei CANN \(pip install -e '.\[ascend\]'"):
        ascend()


def test_plain_switch_from_constructor_and_environment(npu, monkeypatch):
    from dsv3.backends.ascend import FUSED_PATHS, fused_settings

    assert fused_settings(True, {}) == dict.fromkeys(FUSED_PATHS, True)
    assert fused_settings(False, {}) == dict.fromkeys(FUSED_PATHS, False)
    assert fused_settings({"rope": False}, {})["rope"] is False
    settings = fused_settings(True, {"DSV3_ASCEND_PLAIN": "rope, moe_gating"})
    assert [p for p, fused in settings.items() if not fused] == ["rope", "moe_gating"]
    assert not any(fused_settings(True, {"DSV3_ASCEND_PLAIN": "all"}).values())
    with pytest.raises(BackendError, match="DSV3_ASCEND_PLAIN='ropes'.*unknown path 'ropes'"):
        fused_settings(True, {"DSV3_ASCEND_PLAIN": "ropes"})
    with pytest.raises(BackendError, match="unknown path 'mla'"):
        fused_settings({"mla": False}, {})
    monkeypatch.setenv("DSV3_ASCEND_PLAIN", "attention")
    backend = ascend()
    assert backend.capabilities.ops["mla_decode"].startswith("torch") and backend.fused["rope"]


# ---- ops against the reference (bf16), fused and plain -------------------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_rms_norm(npu, calls, fused):
    backend, ref = ascend(fused), ReferenceBackend()
    x = torch.randn(2, 5, 64, generator=gen(0)).bfloat16()
    residual = torch.randn(2, 5, 64, generator=gen(1)).bfloat16()
    weight = (torch.rand(64, generator=gen(2)) + 0.5).bfloat16()
    alone = backend.rms_norm(x, weight, 1e-6)
    assert_close_bf16(alone.values, ref.rms_norm(x, weight, 1e-6).values)
    assert alone.residual is x and alone.quantized is None
    got, expected = backend.rms_norm(x, weight, 1e-6, residual), ref.rms_norm(x, weight, 1e-6, residual)
    out, summed, ref_out, ref_summed = got.values, got.residual, expected.values, expected.residual
    assert torch.equal(summed, ref_summed)
    assert_close_bf16(out, ref_out)
    assert ran(calls, "rms_norm") == fused


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_rotary(npu, calls, fused):
    backend, ref = ascend(fused), ReferenceBackend()
    angles = torch.rand(3, 4, 8, generator=gen(3)) * 6
    cos, sin = angles.cos(), angles.sin()
    q_pe = torch.randn(3, 4, 16, 16, generator=gen(4)).bfloat16()   # [B, T, H, R]
    k_pe = torch.randn(3, 4, 16, generator=gen(5)).bfloat16()       # [B, T, R]
    for x in (q_pe, k_pe):
        assert_close_bf16(backend.rotary(x, cos, sin), ref.rotary(x, cos, sin), scale_tol=1e-2)
    assert ran(calls, "rope") == fused


def test_linear_from_an_fp8_checkpoint_in_bf16(npu):
    from dsv3.backends import fp8

    backend, ref = ascend(), ReferenceBackend()
    weight, scale = fp8.quantize_blocks(torch.randn(192, 320, generator=gen(6)))
    x = torch.randn(4, 320, generator=gen(7)).bfloat16()
    out = backend.linear(x, backend.prepare_linear(weight, scale, "bf16"))
    assert_close_bf16(out, ref.linear(x, ref.prepare_linear(weight, scale, "bf16")))
    with pytest.raises(BackendError, match="ascend910b has no FP8"):
        backend.prepare_linear(weight, scale, "fp8")
    on_950 = ascend(chip=ASCEND_950)        # FP8 kept with its block scales where the chip has FP8
    kept = on_950.prepare_linear(weight, scale, "fp8")
    assert kept.is_fp8 and torch.equal(on_950.linear(x, kept), ref.linear(x, ref.prepare_linear(weight, scale, "fp8")))
    on_950.ue8m0 = True                     # a V3.1 checkpoint's power-of-two activation scales reach its FP8 math
    ue8m0 = ReferenceBackend(ue8m0=True)
    expected = ue8m0.linear(x, ue8m0.prepare_linear(weight, scale, "fp8"))
    assert torch.equal(on_950.linear(x, kept), expected)
    assert not torch.equal(expected, ref.linear(x, ref.prepare_linear(weight, scale, "fp8")))


DEEPSEEK_ROUTING = RoutingConfig(scoring="sigmoid", method="noaux_tc", top_k=8, num_groups=8, topk_groups=4,
                                 normalize=True, scaling=2.5)
TINY_ROUTING = RoutingConfig(scoring="sigmoid", method="noaux_tc", top_k=2, num_groups=4, topk_groups=2,
                             normalize=True, scaling=2.5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("routing, experts", [(DEEPSEEK_ROUTING, 256), (TINY_ROUTING, 8)], ids=["256x8", "tiny"])
def test_moe_route(npu, calls, fused, routing, experts):
    backend, ref = ascend(fused), ReferenceBackend()
    x = torch.randn(9, 64, generator=gen(8)).bfloat16()
    gate = torch.randn(experts, 64, generator=gen(9)) * 0.2
    bias = torch.randn(experts, generator=gen(10)) * 0.05
    weights, ids = backend.moe_route(x, gate, bias, routing)
    ref_weights, ref_ids = ref.moe_route(x, gate, bias, routing)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)          # the same experts, any order
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-5, rtol=1e-5)
    assert ran(calls, "moe_gating") == (fused and experts == 256)      # 8 experts are outside the op's limits


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_moe_experts(npu, calls, fused):
    from dsv3.backends import fp8

    backend, ref = ascend(fused), ReferenceBackend()
    num_experts, inter, hidden = 8, 128, 64
    gate_up, gate_up_scale = fp8.quantize_blocks(torch.randn(num_experts, 2 * inter, hidden, generator=gen(11)) / 8)
    down, down_scale = fp8.quantize_blocks(torch.randn(num_experts, hidden, inter, generator=gen(12)) / 11)
    experts = backend.prepare_experts(gate_up, gate_up_scale, down, down_scale, "bf16")
    ref_experts = ref.prepare_experts(gate_up, gate_up_scale, down, down_scale, "bf16")
    x = torch.randn(11, hidden, generator=gen(13)).bfloat16()
    ids = torch.stack([torch.randperm(num_experts, generator=gen(14 + n))[:3] for n in range(11)])
    ids[:, 0] = 5                                                         # one expert gets every token, some get none
    weights = torch.rand(11, 3, generator=gen(30))
    assert_close_bf16(backend.moe_experts(x, weights, ids, experts), ref.moe_experts(x, weights, ids, ref_experts))
    assert ran(calls, "moe_experts") == fused
    # pairs marked -1 are skipped and their (NaN) weights ignored; token 0 has only skipped pairs, token 1 none
    skipped = torch.rand(11, 3, generator=gen(31)) < 0.6
    skipped[0], skipped[1] = True, False
    ids, weights = ids.masked_fill(skipped, -1), weights.masked_fill(skipped, float("nan"))
    out = backend.moe_experts(x, weights, ids, experts)
    assert_close_bf16(out, ref.moe_experts(x, weights, ids, ref_experts))
    assert not out[0].any()


def _attention_steps(num_heads, rank, rope_dim, block_size, seed=20):
    """Absorbed MLA weights, block tables and three calls over three sequences: a prefill of A (a block and
    4 tokens) and B (3); a second chunk of A starting mid-block, one token of B, and C, whose first block is
    A's (a cached prefix); then a decode of all three. Returns (kv_b, nope, v, tables, num_blocks, steps)
    with steps [(kind, seq_lens, query_lens, MLAInputs)]."""
    nope = v = 32
    kv_b = torch.randn(num_heads * (nope + v), rank, generator=gen(seed)) / rank ** 0.5
    finals = [block_size + 9, 5, block_size + 3]
    tables, num_blocks = block_tables(finals, block_size, gen(seed + 1), shared=(0, 2, 1))
    calls = [("prefill", [block_size + 4, 3], [block_size + 4, 3], [0, 1]),
             ("prefill", [block_size + 8, 4, block_size + 2], [4, 1, 2], [0, 1, 2]),
             ("decode", finals, [1, 1, 1], [0, 1, 2])]
    steps = []
    for i, (kind, seq_lens, query_lens, seqs) in enumerate(calls):
        g, n = gen(seed + 10 + i), sum(query_lens)
        inputs = MLAInputs(torch.randn(n, num_heads, nope, generator=g).bfloat16(),
                           torch.randn(n, num_heads, rope_dim, generator=g).bfloat16(),
                           torch.randn(n, rank, generator=g).bfloat16(),
                           torch.randn(n, rope_dim, generator=g).bfloat16())
        steps.append((kind, paged_batch(tables[seqs], seq_lens, query_lens), inputs))
    return kv_b, nope, v, num_blocks, steps


def _run_attention(backend, kv_b, num_heads, nope, v, rank, rope_dim, block_size, num_blocks, steps):
    weights = backend.prepare_mla(kv_b, num_heads, nope, v, torch.bfloat16)
    cache = backend.allocate_mla_cache(backend.mla_cache_spec(num_blocks, block_size, rank, rope_dim,
                                                              torch.bfloat16))
    return [(backend.mla_prefill if kind == "prefill" else backend.mla_decode)(inputs, cache, batch, weights, 0.07)
            for kind, batch, inputs in steps]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("block_size", [128, 64, 16])
@pytest.mark.parametrize("num_heads, rank, rope_dim", [(16, 512, 64), (4, 64, 16)], ids=["deepseek-dims", "tiny-dims"])
def test_mla_chunked_prefill_shared_prefix_then_decode(npu, calls, fused, block_size, num_heads, rank, rope_dim):
    kv_b, nope, v, num_blocks, steps = _attention_steps(num_heads, rank, rope_dim, block_size)
    args = (kv_b, num_heads, nope, v, rank, rope_dim, block_size, num_blocks, steps)
    for out, ref_out in zip(_run_attention(ascend(fused), *args), _run_attention(ReferenceBackend(), *args),
                            strict=True):
        assert_close_bf16(out, ref_out)
    # the MLA form of the op needs kv_lora_rank 512 and rope 64 (other models run plain), and blocks of 64 or
    # 128 in prefill (sparse_mode 4), 16 or 128 in decode
    fused_calls = (block_size in (64, 128)) * 2 + (block_size in (16, 128))
    assert calls["npu_fused_infer_attention_score"] == (fused_calls if fused and rank == 512 else 0)


def test_mla_cache_spec_is_paged_and_split(npu):
    backend = ascend()
    assert backend.mla_block_size == 128                      # the block size both fused forms take
    spec = backend.mla_cache_spec(6, 128, 512, 64, torch.bfloat16)
    assert spec.shape == (6, 128 * 576) and spec.bytes_per_token == 576 * 2
    assert (spec.num_blocks, spec.block_size, spec.num_tokens) == (6, 128, 768)
    cache = backend.allocate_mla_cache(spec)
    latent, rope, block_size = backend._pages(cache, 512, 64)
    assert latent.shape == (6, 128, 512) and rope.shape == (6, 128, 64) and block_size == 128
    assert latent.is_contiguous() and rope.is_contiguous() and latent.data_ptr() == cache.data_ptr()
    with pytest.raises(BackendError, match="num_blocks and block_size must be at least 1"):
        backend.mla_cache_spec(0, 128, 512, 64, torch.bfloat16)


# ---- the model end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fp8_checkpoint(tmp_path_factory):
    config = load_config("tiny")
    source = RandomSource(config, fp8=True, seed=3)
    tensors = {name: source.get(name) for name in sorted(source.names())}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", tensors, config.to_dict())


def assert_same_greedy(model, ref_model, prompts, steps=6, tie=0.05):
    """Greedy tokens agree with the reference's, except after a step where the reference's two best tokens
    are within `tie` (relative to the logits' range) of each other, where bf16 rounding may pick either."""
    ours = model.greedy_tokens(prompts, steps)
    theirs = ref_model.greedy_tokens(prompts, steps)
    for prompt, a, b in zip(prompts, ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None:
            assert len(a) == len(b)
            continue
        logits = ref_model.logits(torch.tensor([prompt + b[:first]]))[0, -1]
        gap = (logits[b[first]] - logits[a[first]]).item()
        assert gap <= tie * (logits.max() - logits.min()).item(), f"token {first}: {a[first]} vs {b[first]}, gap {gap}"


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_tiny_fp8_checkpoint_end_to_end(npu, calls, tiny_fp8_checkpoint, fused):
    from dsv3 import load_model

    model = load_model(tiny_fp8_checkpoint, backend=ascend(fused), max_seq_len=64, quiet=True)
    ref_model = load_model(tiny_fp8_checkpoint, backend="reference", precision="bf16", max_seq_len=64, quiet=True)
    assert model.precision == "bf16"                  # auto: no FP8 on a 910B, the FP8 checkpoint is dequantized
    tokens = torch.randint(2, 512, (3, 12), generator=gen(40))
    logits, ref_logits = model.logits(tokens), ref_model.logits(tokens)
    assert_close_bf16(logits, ref_logits, scale_tol=3e-2)
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9
    assert_same_greedy(model, ref_model, [[5, 9, 33, 2], [100, 7]])
    # tiny has 8 experts and kv_lora_rank 64: the gating and attention ops' limits fail, so those run plain
    assert {path: ran(calls, path) for path in FUSED_OPS} == {
        "rms_norm": fused, "rope": fused, "attention": False, "moe_gating": False, "moe_experts": fused}


@pytest.mark.slow
def test_deepseek_shaped_model_runs_every_fused_op(npu, calls):
    """DeepSeek-V3's attention and routing shapes (kv_lora_rank 512, rope 64, 256 experts in 8 groups, top-4
    groups, 8 experts per token) at a small width, so that every fused op is in play."""
    from dsv3 import load_model

    config = load_config("tiny").replace(
        num_hidden_layers=2, kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16, n_routed_experts=256,
        n_group=8, topk_group=4, num_experts_per_tok=8, moe_intermediate_size=32, num_nextn_predict_layers=0)
    model = load_model(config, backend=ascend(), precision="bf16", max_seq_len=32, seed=1, quiet=True)
    ref_model = load_model(config, backend="reference", precision="bf16", max_seq_len=32, seed=1, quiet=True)
    tokens = torch.randint(2, 512, (2, 6), generator=gen(41))
    assert_close_bf16(model.logits(tokens), ref_model.logits(tokens), scale_tol=3e-2)
    assert_same_greedy(model, ref_model, [[5, 9, 33, 2, 17]], steps=3)
    assert all(ran(calls, path) for path in FUSED_OPS), dict(calls)


def test_a_default_engine_decodes_on_the_fused_attention(npu, calls):
    """The engine's block size is the backend's when not given: 128 on Ascend, a size the fused decode takes
    (16 or 128; at 64, another backend's size, every decode step would run the plain path without a word)."""
    from dsv3 import load_model

    config = load_config("tiny").replace(num_hidden_layers=2, kv_lora_rank=512, qk_rope_head_dim=64,
                                         num_attention_heads=16, num_nextn_predict_layers=0)
    model = load_model(config, backend=ascend(), precision="bf16", max_model_len=64, cache_tokens=256, quiet=True)
    assert model.engine.config.block_size == 128
    calls.clear()
    (output,) = model.generate([[5, 9, 33, 2]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    model.shutdown()
    assert len(output.outputs[0].token_ids) == 4
    # one prefill step, then three decode steps, each running every layer's attention fused
    assert calls["npu_fused_infer_attention_score"] == 4 * config.num_hidden_layers, dict(calls)
