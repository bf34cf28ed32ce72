"""Model configs: the built-in YAML files, checkpoint config.json (DeepSeek's and transformers 5's), validation."""

from __future__ import annotations

import json
import math

import hf_helpers as hf
import pytest

from dsv3.config import from_dict, load_config
from dsv3.errors import ConfigError


def test_deepseek_v3_config_facts():
    c = load_config("deepseek-v3")
    assert (c.num_hidden_layers, c.hidden_size, c.n_routed_experts, c.num_experts_per_tok) == (61, 7168, 256, 8)
    assert (c.n_group, c.topk_group, c.topk_method, c.scoring_func) == (8, 4, "noaux_tc", "sigmoid")
    assert c.is_fp8 and c.q_lora_rank == 1536 and c.num_nextn_predict_layers == 1
    # the absorbed latent cache: (512 + 64) BF16 values per token per layer, about 70 KB per token
    assert c.latent_cache_bytes_per_token() == 61 * 576 * 2
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    # softmax scale: 1/sqrt(192) times mscale^2 with mscale = 0.1 * 1.0 * ln(40) + 1
    assert math.isclose(c.softmax_scale(), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_deepseek_v2_lite_config_facts():
    c = load_config("deepseek-v2-lite")
    assert c.q_lora_rank is None and c.model_type == "deepseek_v2"
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == ("softmax", "greedy", False)
    assert math.isclose(c.softmax_scale(), 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


def test_tiny_yaml_is_a_v3_architecture():
    c = load_config("tiny")
    assert c.topk_method == "noaux_tc" and c.n_group > 1 and c.n_shared_experts and c.rope_scaling
    assert c.first_k_dense_replace >= 1 and c.is_fp8


def test_config_json_and_yaml_path_forms(tmp_path):
    official = hf.official_config("v3")
    (tmp_path / "config.json").write_text(json.dumps(official))
    from_dir, from_file = load_config(tmp_path), load_config(tmp_path / "config.json")
    assert from_dir == from_file
    assert from_dir.rope_scaling == official["rope_scaling"] and from_dir.source.endswith("config.json")


@pytest.mark.parametrize("variant", ["v3", "v2_lite", "v2_group", "v3_plain"])
def test_transformers5_config_json_reads_like_deepseeks(variant):
    """transformers 5 writes rope settings as rope_parameters and leaves out scoring_func/topk_method
    for V3; the same model read from either config.json is the same config."""
    official = hf.official_config(variant)
    written_by_transformers = json.loads(json.dumps(hf.hf_config(official).to_dict()))
    ours, theirs = from_dict(official), from_dict(written_by_transformers)
    for field in ("q_lora_rank", "kv_lora_rank", "n_group", "topk_group", "topk_method", "scoring_func",
                  "norm_topk_prob", "routed_scaling_factor", "rope_theta", "num_experts_per_tok"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.softmax_scale() == theirs.softmax_scale()
    if official["rope_scaling"]:
        for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim"):
            assert theirs.rope_scaling[key] == official["rope_scaling"][key]
    else:
        assert theirs.rope_scaling is None


def test_transformers_v2_default_null_groups_mean_no_groups():
    raw = {**hf.official_config("v2_lite"), "n_group": None, "topk_group": None}
    c = from_dict(raw)
    assert (c.n_group, c.topk_group) == (1, 1)


def test_v2_routing_defaults_when_absent():
    raw = {k: v for k, v in hf.official_config("v2_lite").items()
           if k not in ("scoring_func", "topk_method", "norm_topk_prob")}
    c = from_dict(raw)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob) == ("softmax", "greedy", False)


def test_unknown_keys_are_ignored():
    assert from_dict({**hf.official_config("v3"), "architectures": ["DeepseekV3ForCausalLM"], "use_cache": True})


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("hidden_size", 1.5), ("num_hidden_layers", True), ("kv_lora_rank", None),
    ("q_lora_rank", 0), ("qk_rope_head_dim", 7), ("v_head_dim", -1), ("max_position_embeddings", 0),
    ("first_k_dense_replace", 4), ("first_k_dense_replace", -1), ("moe_layer_freq", 0),
    ("num_nextn_predict_layers", -1), ("rms_norm_eps", 1.5), ("rope_theta", 0), ("model_type", "llama"),
    ("n_routed_experts", 0), ("num_experts_per_tok", 0), ("num_experts_per_tok", 5), ("n_group", 3),
    ("topk_group", 5), ("topk_method", "top1"), ("scoring_func", "tanh"), ("routed_scaling_factor", 0),
    ("n_shared_experts", -2), ("norm_topk_prob", "yes"), ("tie_word_embeddings", 1), ("eos_token_id", [1, "x"]),
    ("bos_token_id", 0.5),
    ("rope_scaling", "yarn"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("rope_scaling", {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32}),
    ("rope_scaling", {"type": "yarn", "factor": 8.0}),
    ("rope_scaling", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": -32}),
    ("rope_scaling", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "beta_fast": 1, "beta_slow": 32}),
    ("rope_scaling", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": "1"}),
    ("quantization_config", {"quant_method": "gptq"}),
])
def test_field_out_of_range_is_named(field, value):
    """num_experts_per_tok 5 exceeds topk_group x per-group experts (2 x 2); n_group 3 does not divide 8."""
    raw = {**hf.official_config("v3"), field: value}
    with pytest.raises(ConfigError) as error:
        from_dict(raw, source="cfg.json")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cfg.json:")
    assert repr(field) in message


def test_missing_required_field_is_named():
    raw = {k: v for k, v in hf.official_config("v3").items() if k != "kv_lora_rank"}
    with pytest.raises(ConfigError, match="missing required field 'kv_lora_rank'"):
        from_dict(raw)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad_yaml)


def test_unknown_name_lists_the_built_in_configs():
    with pytest.raises(ConfigError, match="built-in configs: .*deepseek-v3.*tiny"):
        load_config("deepseek-v9")


def test_replace_validates():
    c = load_config("tiny")
    assert c.replace(num_hidden_layers=4).num_hidden_layers == 4
    with pytest.raises(ConfigError, match="'num_hidden_layers'"):
        c.replace(num_hidden_layers=0)
