"""dsv3 against an independent implementation: Hugging Face transformers' DeepSeek-V3 / V2.

Each test builds a tiny transformers model with random weights, writes it in the official
DeepSeek checkpoint layout (per-expert tensors, interleaved rope dims, config.json with
rope_scaling), loads it with dsv3.load_model on the reference backend and compares the logits
at every position. Sequences are longer than YaRN's original_max_position_embeddings (32),
so the YaRN frequencies and mscale matter.
"""

from __future__ import annotations

import copy
import json

import hf_helpers as hf
import pytest
import torch
from dsv3.backends.reference import ReferenceBackend

import dsv3

BATCH, LENGTH = 2, 80  # 80 > original_max_position_embeddings = 32


def tokens_for(config: dict, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab_size"], (BATCH, length), generator=generator)


def load(path, precision: str, **options) -> dsv3.Model:
    return dsv3.load_model(path, backend="reference", precision=precision, max_seq_len=128, quiet=True, **options)


# ---- fp32: exact parity ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["v3", "v2_lite", "v2_group", "v3_plain"])
def test_fp32_logits_match_transformers(variant, tmp_path):
    """V3 (sigmoid + correction bias + groups, YaRN mscale != mscale_all_dim), V2-Lite (plain q_proj,
    softmax greedy), V2 (group_limited_greedy) and V3 without YaRN or query LoRA."""
    config = hf.official_config(variant)
    model = hf.build_hf_model(config, seed=1)
    path = hf.save_official(tmp_path / "ckpt", hf.official_tensors(model), config, "fp32")
    assert len(list(path.glob("*.safetensors"))) > 1  # the index and several shards are exercised
    tokens = tokens_for(config)
    ours = load(path, "fp32").logits(tokens)
    assert ours.dtype == torch.float32 and ours.shape == (BATCH, LENGTH, config["vocab_size"])
    assert hf.relative_error(ours, hf.hf_logits(model, tokens)) <= 1e-4


def test_rope_convention_is_the_checkpoints_interleaved_one(tmp_path):
    """transformers with rope_interleave=False keeps rope dims as halves; exported with the rope rows
    put back into DeepSeek's interleaved pairs, dsv3 matches it; exported unpermuted it must not."""
    config = hf.official_config("v3")
    model = hf.build_hf_model(config, seed=2, rope_interleave=False)
    tokens = tokens_for(config)
    expected = hf.hf_logits(model, tokens)
    permuted = hf.save_official(tmp_path / "pairs", hf.official_tensors(model, rope_interleave=False), config)
    assert hf.relative_error(load(permuted, "fp32").logits(tokens), expected) <= 1e-4
    unpermuted = hf.save_official(tmp_path / "halves", hf.official_tensors(model, rope_interleave=True), config)
    assert hf.relative_error(load(unpermuted, "fp32").logits(tokens), expected) > 1e-2


def test_yarn_changes_the_logits(tmp_path):
    """The parity above is not blind to YaRN: the same weights without rope_scaling give other logits."""
    config = hf.official_config("v3")
    model = hf.build_hf_model(config, seed=1)
    tokens = tokens_for(config)
    plain = hf.build_hf_model({**config, "rope_scaling": None}, seed=1)
    plain.load_state_dict(model.state_dict())
    path = hf.save_official(tmp_path / "ckpt", hf.official_tensors(model), config)
    ours = load(path, "fp32").logits(tokens)
    assert hf.relative_error(ours, hf.hf_logits(model, tokens)) <= 1e-4
    assert hf.relative_error(ours, hf.hf_logits(plain, tokens)) > 1e-2


def test_mtp_module_matches_transformers_decoder_layer(tmp_path):
    """The MTP module (layer num_hidden_layers) against transformers' own decoder layer given its weights;
    without load_mtp its tensors are ignored and the main logits are unchanged."""
    config = {**hf.official_config("v3"), "num_nextn_predict_layers": 1}
    model = hf.build_hf_model(config, seed=1)
    donor = hf.build_hf_model(config, seed=5)
    mtp = hf.mtp_tensors(model, donor, seed=6)
    path = hf.save_official(tmp_path / "ckpt", {**hf.official_tensors(model), **mtp}, config)
    tokens = tokens_for(config, length=41)
    with_mtp = load(path, "fp32", load_mtp=True)
    ours = with_mtp.transformer.mtp_logits(tokens[:, :-1], tokens[:, 1:])
    assert ours.shape == (BATCH, 40, config["vocab_size"])
    expected = hf.hf_mtp_logits(model, mtp, tokens[:, :-1], tokens[:, 1:])
    assert hf.relative_error(ours, expected) <= 1e-4
    without = load(path, "fp32")
    assert hf.relative_error(without.logits(tokens), hf.hf_logits(model, tokens)) <= 1e-4


# ---- bf16 -------------------------------------------------------------------------------------

def dense_routing(variant: str) -> dict:
    """Two layers, every routed expert active: rounding cannot flip a discrete expert choice here
    (the choice itself is proven exactly by the fp32 tests and tests/test_reference_ops.py)."""
    config = hf.official_config(variant, num_hidden_layers=2, num_experts_per_tok=8)
    if config["n_group"] > 1:
        config["topk_group"] = config["n_group"]
    return config


def decided_positions(reference: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Positions whose top-1 is decided at bf16 precision: the fp32 reference's best logit leads
    the second by more than `threshold` standard deviations of that position's logits."""
    top2 = reference.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > threshold * reference.std(dim=-1)


@pytest.mark.parametrize("variant", ["v3", "v2_lite"])
def test_bf16_logits_match_transformers_in_bf16(variant, tmp_path):
    """dsv3 precision bf16 from a bf16 checkpoint against transformers run in bf16: relative error
    <= 2e-2, and the same top-1 wherever top-1 is decided at bf16 precision (most positions)."""
    config = dense_routing(variant)
    model = hf.build_hf_model(config, seed=3)
    path = hf.save_official(tmp_path / "ckpt", hf.official_tensors(model), config, "bf16")
    tokens = tokens_for(config)
    exact = hf.hf_logits(model, tokens)
    expected = hf.hf_logits(hf.to_bf16(model), tokens)
    ours = load(path, "bf16").logits(tokens)
    assert ours.dtype == torch.float32
    assert hf.relative_error(ours, expected) <= 2e-2
    decided = decided_positions(exact)
    assert decided.float().mean() >= 0.6  # not vacuous: measured about 3 in 4
    assert torch.equal(ours.argmax(-1)[decided], expected.argmax(-1)[decided])


def fp8_v3_checkpoint(tmp_path):
    """A small V3-routed FP8 checkpoint written as DeepSeek ships it, and transformers' model holding its
    dequantized weights: (config, model, checkpoint path, tokens, transformers' exact logits)."""
    config = {**dense_routing("v3"), **hf.FP8_SHAPES}
    model = hf.build_hf_model(config, seed=4)
    tensors = hf.official_tensors(model)
    path = hf.save_official(tmp_path / "ckpt", tensors, config, "fp8")
    hf.load_official_into(model, hf.dequantized(hf.to_checkpoint_dtypes(tensors, "fp8")))
    tokens = tokens_for(config)
    return config, model, path, tokens, hf.hf_logits(model, tokens)


# ---- fp8 --------------------------------------------------------------------------------------

def test_fp8_logits_within_activation_quantization_error(tmp_path):
    """dsv3 precision fp8 on an FP8 checkpoint against transformers given the dequantized weights.

    Weights are identical on both sides, so the difference is dsv3's run-time quantization of the
    activations (per token per 128 channels to e4m3, about 2^-4 relative rounding per element) plus
    bf16 activations. The tolerance is measured, not guessed: transformers itself, with the same
    activation rounding applied to the same GEMM inputs, moves by e_q from its exact logits; dsv3
    must stay within 1.5 e_q + 2e-2 (bf16), which must be far below a wrong model's error.
    """
    config, model, path, tokens, exact = fp8_v3_checkpoint(tmp_path)
    with hf.ActivationFakeQuant(model):
        quantized = hf.hf_logits(model, tokens)
    activation_error = hf.relative_error(quantized, exact)
    tolerance = 1.5 * activation_error + 2e-2

    ours = load(path, "fp8").logits(tokens)
    error = hf.relative_error(ours, exact)
    wrong = hf.relative_error(ours, hf.hf_logits(hf.build_hf_model(config, seed=40), tokens))
    assert 0.01 < activation_error < 0.2, activation_error  # quantization is on, and the bound is not vacuous
    assert error <= tolerance, (error, activation_error)
    assert wrong >= 5 * tolerance, (wrong, tolerance)


def test_v3_1_ue8m0_scales_reach_the_backend(tmp_path):
    """A DeepSeek-V3.1 checkpoint (quantization_config.scale_fmt "ue8m0") runs with activation scales rounded
    up to powers of two, as it was trained: the backend the model runs on quantizes that way, and the
    logits differ from the same weights without scale_fmt while staying as close to the exact ones."""
    config, model, path, tokens, exact = fp8_v3_checkpoint(tmp_path)
    v3_1 = json.loads((path / "config.json").read_text())
    v3_1["quantization_config"]["scale_fmt"] = "ue8m0"
    (path / "config.json").write_text(json.dumps(v3_1))
    ue8m0 = load(path, "fp8")
    _, scales = ue8m0.backend.quantize_activation(torch.randn(4, 256, generator=torch.Generator().manual_seed(1)))
    exponents = torch.log2(scales.double())
    assert torch.equal(exponents, exponents.round()), "activation scales are not powers of two"
    ours = ue8m0.logits(tokens)

    del v3_1["quantization_config"]["scale_fmt"]
    (path / "config.json").write_text(json.dumps(v3_1))
    plain = load(path, "fp8").logits(tokens)
    assert not torch.equal(ours, plain)
    assert hf.relative_error(ours, exact) <= 1.5 * hf.relative_error(plain, exact)


def test_fp8_e4m3fnuz_emulation(tmp_path):
    """MI300X numerics, emulated on the reference backend: weights converted to e4m3fnuz (same bits, scales
    doubled), activations quantized to fnuz with max 224. fnuz's grid is fn's halved and 224 = 448 / 2, so
    the result equals the e4m3fn path exactly; with the full fnuz max 240 it differs but is as accurate."""
    config, model, path, tokens, exact = fp8_v3_checkpoint(tmp_path)
    fn = load(path, "fp8").logits(tokens)

    def fnuz_logits(**options):
        backend = ReferenceBackend(fp8_format="e4m3fnuz", **options)
        fnuz = dsv3.load_model(path, backend=backend, precision="fp8", max_seq_len=128, quiet=True)
        assert fnuz.transformer.layers[0].attn.o_proj.weight.weight.dtype == torch.float8_e4m3fnuz
        return fnuz.logits(tokens)

    assert torch.equal(fnuz_logits(), fn)
    full_range = fnuz_logits(fp8_max=240.0)
    assert not torch.equal(full_range, fn)
    assert hf.relative_error(full_range, exact) <= 1.5 * hf.relative_error(fn, exact)


def test_fp8_checkpoint_in_fp32_equals_dequantized_weights(tmp_path):
    """Loading an FP8 checkpoint at precision fp32 dequantizes 128x128 blocks exactly (partial blocks
    included): parity with transformers given the dequantized weights is exact."""
    config = {**hf.official_config("v3", num_hidden_layers=2), **hf.FP8_SHAPES}
    model = hf.build_hf_model(config, seed=4)
    tensors = hf.official_tensors(model)
    path = hf.save_official(tmp_path / "ckpt", tensors, config, "fp8")
    reference = copy.deepcopy(model)
    hf.load_official_into(reference, hf.dequantized(hf.to_checkpoint_dtypes(tensors, "fp8")))
    tokens = tokens_for(config)
    ours = load(path, "fp32").logits(tokens)
    assert hf.relative_error(ours, hf.hf_logits(reference, tokens)) <= 1e-4
    assert hf.relative_error(ours, hf.hf_logits(model, tokens)) > 1e-3  # the FP8 rounding is really there
