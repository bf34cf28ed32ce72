"""Model configuration: a checkpoint's config.json or a YAML file in configs/.

Field names are the Hugging Face config.json names, so a YAML config is
config.json written as YAML. Every field is checked; a wrong one is named.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsv3.errors import ConfigError

#: the built-in configs: configs/ in the repository, installed as the package dsv3.configs
CONFIGS_DIR = Path(str(importlib.resources.files("dsv3.configs")))


@dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3/R1, V2/V2.5 and V2-Lite hyperparameters.

    Attributes:
        # sizes
        vocab_size: tokens in the vocabulary.
        hidden_size: model width D.
        intermediate_size: dense MLP width (the first `first_k_dense_replace` layers).
        moe_intermediate_size: width I of each routed and shared expert.
        num_hidden_layers: transformer blocks (the MTP module is layer index num_hidden_layers).
        first_k_dense_replace: leading layers with a dense MLP instead of MoE.
        moe_layer_freq: every moe_layer_freq-th layer after those is MoE (1 in all released models).
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: lm_head shares embed_tokens.
        # mla
        num_attention_heads: query heads H.
        q_lora_rank: rank of the query down-projection, or None for a plain q_proj (V2-Lite).
        kv_lora_rank: rank of the latent KV (what the cache stores, plus the rope part).
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: per-head dims.
        # moe
        n_routed_experts: routed experts E (None for a dense model).
        n_shared_experts: shared experts, run on every token, fused into one MLP.
        num_experts_per_tok: k experts per token.
        n_group, topk_group: expert groups and how many a token may use.
        topk_method: "noaux_tc" (V3), "group_limited_greedy" (V2), "greedy" (V2-Lite).
        scoring_func: "sigmoid" (V3) or "softmax" (V2).
        norm_topk_prob: normalize the chosen experts' weights.
        routed_scaling_factor: scale of the routed experts' output.
        # rope / yarn
        rope_theta: rotary base.
        rope_scaling: None, or {"type": "yarn", factor, original_max_position_embeddings,
            beta_fast, beta_slow, mscale, mscale_all_dim}.
        max_position_embeddings: longest supported context.
        # mtp
        num_nextn_predict_layers: MTP modules stored after the main layers (1 in V3).
        # tokens and checkpoint
        bos_token_id, eos_token_id: special token ids.
        quantization_config: the checkpoint's FP8 block-quantization record, or None.
        model_type: "deepseek_v3" or "deepseek_v2".
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    quantization_config: dict | None = None
    model_type: str = "deepseek_v3"
    source: str = field(default="<dict>", compare=False)

    # ---- derived ------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        """The checkpoint stores FP8 block-quantized linears."""
        return bool(self.quantization_config) and self.quantization_config.get("quant_method") == "fp8"

    @property
    def ue8m0_scales(self) -> bool:
        return bool(self.quantization_config) and self.quantization_config.get("scale_fmt") == "ue8m0"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    def is_moe_layer(self, index: int) -> bool:
        return (self.n_routed_experts is not None and index >= self.first_k_dense_replace
                and index % self.moe_layer_freq == 0)

    def latent_cache_bytes_per_token(self, element_size: int = 2) -> int:
        """Bytes the MLA latent cache holds per token over all layers."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * element_size

    def yarn_mscale(self) -> float:
        """The softmax-scale correction mscale: 0.1 * mscale_all_dim * ln(factor) + 1 (1 without it)."""
        scaling = self.rope_scaling or {}
        if not scaling.get("mscale_all_dim"):
            return 1.0
        return yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])

    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.yarn_mscale() ** 2

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        return {k: v for k, v in out.items() if v is not None or k in ("q_lora_rank",)}

    def replace(self, **changes) -> "ModelConfig":
        return validate(dataclasses.replace(self, **changes))


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


_ROUTING_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
_SCORING = ("sigmoid", "softmax")
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
    """Build and validate a config from config.json-style keys; unknown keys are ignored."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, found {type(raw).__name__}")
    raw = dict(raw)
    rope = raw.pop("rope_parameters", None)  # transformers >= 5 nests rope settings here
    if isinstance(rope, dict):
        raw.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raw.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    for name in ("n_group", "topk_group"):  # null (transformers' V2 default) means no expert groups
        if name in raw and raw[name] is None:
            del raw[name]
    if raw.get("model_type") == "deepseek_v2":
        raw.setdefault("scoring_func", "softmax")
        raw.setdefault("topk_method", "greedy")
        raw.setdefault("norm_topk_prob", False)
    names = {f.name: f for f in dataclasses.fields(ModelConfig)}
    required = [n for n, f in names.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if raw.get(n) is None]
    if missing:
        raise ConfigError(f"{source}: missing required field {missing[0]!r}")
    values = {k: v for k, v in raw.items() if k in names and k != "source"}
    for name, value in values.items():
        bad = _non_finite(value)
        if bad is not None:
            raise ConfigError(f"{source}: field {name!r} must be finite, found {bad}")
    return validate(ModelConfig(**values, source=source))


def _non_finite(value) -> float | None:
    """The first NaN or infinite number in a field's value (JSON allows NaN and Infinity), else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        bad = _non_finite(item)
        if bad is not None:
            return bad
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, config: ModelConfig, name: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{config.source}: field {name!r} must be {expected}, found {getattr(config, name)!r}")


def validate(c: ModelConfig) -> ModelConfig:
    """Check every field's type and range; raise ConfigError naming the first wrong one."""
    def positive_int(name):
        v = getattr(c, name)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, c, name, "a positive integer")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                 "max_position_embeddings", "moe_layer_freq", "n_group", "topk_group"):
        positive_int(name)
    _check(isinstance(c.qk_rope_head_dim, int) and c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
           c, "qk_rope_head_dim", "a positive even integer")
    if c.q_lora_rank is not None:
        positive_int("q_lora_rank")
    _check(isinstance(c.first_k_dense_replace, int) and 0 <= c.first_k_dense_replace <= c.num_hidden_layers,
           c, "first_k_dense_replace", f"an integer in [0, num_hidden_layers={c.num_hidden_layers}]")
    _check(isinstance(c.num_nextn_predict_layers, int) and c.num_nextn_predict_layers >= 0,
           c, "num_nextn_predict_layers", "a non-negative integer")
    _check(_is_number(c.rms_norm_eps) and 0 < c.rms_norm_eps < 1, c, "rms_norm_eps", "in (0, 1)")
    _check(_is_number(c.rope_theta) and 0 < c.rope_theta < math.inf, c, "rope_theta", "a positive finite number")
    _check(c.model_type in _MODEL_TYPES, c, "model_type", f"one of {_MODEL_TYPES}")
    for name in ("tie_word_embeddings", "norm_topk_prob"):
        _check(isinstance(getattr(c, name), bool), c, name, "true or false")
    _check(c.bos_token_id is None or _is_int(c.bos_token_id), c, "bos_token_id", "an integer or null")
    eos = c.eos_token_id
    _check(eos is None or _is_int(eos) or (isinstance(eos, list) and all(_is_int(t) for t in eos)),
           c, "eos_token_id", "an integer, a list of integers or null")
    if c.n_routed_experts is not None:
        positive_int("n_routed_experts")
        positive_int("num_experts_per_tok")
        _check(c.scoring_func in _SCORING, c, "scoring_func", f"one of {_SCORING}")
        _check(c.topk_method in _ROUTING_METHODS, c, "topk_method", f"one of {_ROUTING_METHODS}")
        _check(c.n_routed_experts % c.n_group == 0, c, "n_group",
               f"a divisor of n_routed_experts={c.n_routed_experts}")
        _check(c.topk_group <= c.n_group, c, "topk_group", f"at most n_group={c.n_group}")
        per_group = c.n_routed_experts // c.n_group
        _check(c.num_experts_per_tok <= c.topk_group * per_group, c, "num_experts_per_tok",
               f"at most topk_group x experts per group = {c.topk_group * per_group}")
        if c.topk_method == "noaux_tc" and c.n_group > 1:
            _check(per_group >= 2, c, "n_group", "small enough to leave at least 2 experts per group (noaux_tc)")
        if c.n_shared_experts is not None:
            _check(isinstance(c.n_shared_experts, int) and c.n_shared_experts >= 0, c, "n_shared_experts",
                   "a non-negative integer")
        _check(_is_number(c.routed_scaling_factor) and 0 < c.routed_scaling_factor < math.inf,
               c, "routed_scaling_factor", "a positive finite number")
    if c.rope_scaling is not None:
        _check(isinstance(c.rope_scaling, dict), c, "rope_scaling", "a mapping or null")
        kind = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
        _check(kind == "yarn", c, "rope_scaling", "null or a 'yarn' mapping (the only scaling DeepSeek uses)")
        factor = c.rope_scaling.get("factor")
        _check(_is_number(factor) and 1 <= factor < math.inf, c, "rope_scaling",
               "a mapping whose factor is a finite number >= 1")
        original = c.rope_scaling.get("original_max_position_embeddings")
        _check(_is_int(original) and original > 0, c, "rope_scaling",
               "a mapping with a positive integer original_max_position_embeddings")
        beta_fast, beta_slow = c.rope_scaling.get("beta_fast", 32), c.rope_scaling.get("beta_slow", 1)
        _check(_is_number(beta_fast) and _is_number(beta_slow) and math.inf > beta_fast > beta_slow > 0, c,
               "rope_scaling",
               "a mapping with beta_fast > beta_slow > 0")
        for name in ("mscale", "mscale_all_dim"):
            value = c.rope_scaling.get(name, 0)
            _check(_is_number(value) and 0 <= value < math.inf, c, "rope_scaling",
                   f"a mapping whose {name} is a finite number >= 0")
    if c.quantization_config:
        q = c.quantization_config
        _check(isinstance(q, dict), c, "quantization_config", "a mapping or null")
        _check(q.get("quant_method") == "fp8", c, "quantization_config", "quant_method 'fp8' (or absent)")
        _check(q.get("weight_block_size", [128, 128]) in ([128, 128], (128, 128)), c, "quantization_config",
               "weight_block_size [128, 128]")
    return c


def load_config(path: str | Path) -> ModelConfig:
    """Read a config from a checkpoint directory, a config.json, a YAML file or a name in configs/.

    Args:
        path: e.g. "/ckpt/DeepSeek-V3", "config.json", "configs/tiny.yaml" or "deepseek-v3".
    """
    p = Path(path)
    if not p.exists() and (CONFIGS_DIR / f"{path}.yaml").exists():
        p = CONFIGS_DIR / f"{path}.yaml"
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        names = ", ".join(sorted(f.stem for f in CONFIGS_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: no such config file or checkpoint directory (built-in configs: {names})")
    if not p.is_file():
        raise ConfigError(f"{p}: not a regular file (a config is a YAML or JSON file)")
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    return from_dict(raw, source=str(p))
