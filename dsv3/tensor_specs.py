"""Every tensor of a DeepSeek checkpoint in the Hugging Face layout: its name, shape and kind.

One table used to check a checkpoint before any weight is read, to write the
built-in tiny checkpoint, to make synthetic weights and to convert checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig

LINEAR = "linear"  # FP8 + weight_scale_inv in an FP8 checkpoint, else floating point
FLOAT = "float"    # floating point, never quantized (norms, embeddings, router)
FP32 = "fp32"      # float32 (the router's correction bias)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str


def _attention(c: ModelConfig, p: str) -> dict[str, TensorSpec]:
    h, d = c.num_attention_heads, c.hidden_size
    t = {}
    if c.q_lora_rank is None:
        t[f"{p}.q_proj"] = TensorSpec((h * c.qk_head_dim, d), LINEAR)
    else:
        t[f"{p}.q_a_proj"] = TensorSpec((c.q_lora_rank, d), LINEAR)
        t[f"{p}.q_a_layernorm"] = TensorSpec((c.q_lora_rank,), FLOAT)
        t[f"{p}.q_b_proj"] = TensorSpec((h * c.qk_head_dim, c.q_lora_rank), LINEAR)
    t[f"{p}.kv_a_proj_with_mqa"] = TensorSpec((c.kv_lora_rank + c.qk_rope_head_dim, d), LINEAR)
    t[f"{p}.kv_a_layernorm"] = TensorSpec((c.kv_lora_rank,), FLOAT)
    t[f"{p}.kv_b_proj"] = TensorSpec((h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), LINEAR)
    t[f"{p}.o_proj"] = TensorSpec((d, h * c.v_head_dim), LINEAR)
    return t


def _mlp(p: str, hidden: int, inter: int) -> dict[str, TensorSpec]:
    return {f"{p}.gate_proj": TensorSpec((inter, hidden), LINEAR),
            f"{p}.up_proj": TensorSpec((inter, hidden), LINEAR),
            f"{p}.down_proj": TensorSpec((hidden, inter), LINEAR)}


def _block(c: ModelConfig, index: int, moe: bool) -> dict[str, TensorSpec]:
    p = f"model.layers.{index}"
    d = c.hidden_size
    t = {f"{p}.input_layernorm": TensorSpec((d,), FLOAT), f"{p}.post_attention_layernorm": TensorSpec((d,), FLOAT)}
    t.update(_attention(c, f"{p}.self_attn"))
    if not moe:
        t.update(_mlp(f"{p}.mlp", d, c.intermediate_size))
        return t
    t[f"{p}.mlp.gate"] = TensorSpec((c.n_routed_experts, d), FLOAT)
    if c.topk_method == "noaux_tc":
        t[f"{p}.mlp.gate.e_score_correction_bias"] = TensorSpec((c.n_routed_experts,), FP32)
    for e in range(c.n_routed_experts):
        t.update(_mlp(f"{p}.mlp.experts.{e}", d, c.moe_intermediate_size))
    if c.n_shared_experts:
        t.update(_mlp(f"{p}.mlp.shared_experts", d, c.moe_intermediate_size * c.n_shared_experts))
    return t


def module_specs(c: ModelConfig, include_mtp: bool = True) -> dict[str, TensorSpec]:
    """Modules (name without .weight) -> spec, in checkpoint order.

    The correction bias is listed under its full tensor name (it has no .weight).
    """
    d, v = c.hidden_size, c.vocab_size
    t = {"model.embed_tokens": TensorSpec((v, d), FLOAT)}
    for i in range(c.num_hidden_layers):
        t.update(_block(c, i, c.is_moe_layer(i)))
    t["model.norm"] = TensorSpec((d,), FLOAT)
    if not c.tie_word_embeddings:
        t["lm_head"] = TensorSpec((v, d), FLOAT)
    if include_mtp:
        for j in range(c.num_nextn_predict_layers):
            i = c.num_hidden_layers + j
            p = f"model.layers.{i}"
            t.update({f"{p}.embed_tokens": TensorSpec((v, d), FLOAT), f"{p}.enorm": TensorSpec((d,), FLOAT),
                      f"{p}.hnorm": TensorSpec((d,), FLOAT), f"{p}.eh_proj": TensorSpec((d, 2 * d), LINEAR)})
            t.update(_block(c, i, c.n_routed_experts is not None))
            t.update({f"{p}.shared_head.norm": TensorSpec((d,), FLOAT),
                      f"{p}.shared_head.head": TensorSpec((v, d), FLOAT)})
    return t


def tensor_name(module: str) -> str:
    """The stored tensor name of a module's weight."""
    return module if module.endswith("e_score_correction_bias") else f"{module}.weight"


def mtp_prefixes(c: ModelConfig) -> tuple[str, ...]:
    return tuple(f"model.layers.{c.num_hidden_layers + j}." for j in range(c.num_nextn_predict_layers))
