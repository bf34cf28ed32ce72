"""Tiny Hugging Face transformers DeepSeek models as an independent oracle for dsv3.

`build_hf_model` makes a DeepseekV3ForCausalLM / DeepseekV2ForCausalLM with random
weights of a useful scale; `official_tensors` writes its state dict in the official
DeepSeek checkpoint layout (one tensor per routed expert, rope dims interleaved);
`save_official` stores it, optionally as FP8 with weight_scale_inv, with a
config.json written the way DeepSeek's checkpoints write it (rope_scaling, not
transformers 5's rope_parameters).

None of this uses dsv3's model code: only dsv3.checkpoint.save_checkpoint (a file
writer) and dsv3.backends.fp8.quantize_blocks (any valid FP8 blocks will do: what they
mean is computed here independently, in `dequantized`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from dsv3.backends.fp8 import quantize_blocks
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from dsv3.checkpoint import save_checkpoint

#: Tiny shapes shared by the variants; a variant overrides what it needs.
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False)

#: Shapes for FP8 checkpoints: experts of 128 rows (FP8 gate/up blocks must not straddle), partial
#: 128-blocks elsewhere (hidden 192 = 128 + 64 columns, kv_a_proj_with_mqa 96 + 16 = 112 rows).
FP8_SHAPES = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=128, q_lora_rank=160,
                  kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)

YARN_V3 = dict(type="yarn", factor=8.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=0.8)
YARN_V2_LITE = dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                    mscale=0.707, mscale_all_dim=0.707)

#: name -> (model_type, config fields on top of BASE, rope_scaling or None)
VARIANTS = {
    # DeepSeek-V3: sigmoid scores, correction bias, 4 groups of 2, YaRN with mscale != mscale_all_dim.
    "v3": ("deepseek_v3", dict(n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
                               norm_topk_prob=True, routed_scaling_factor=2.5), YARN_V3),
    # DeepSeek-V2-Lite: plain q_proj, softmax greedy routing, 2 shared experts, unnormalized weights.
    "v2_lite": ("deepseek_v2", dict(q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
                                    topk_group=1, topk_method="greedy", scoring_func="softmax",
                                    norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=128),
                YARN_V2_LITE),
    # DeepSeek-V2: softmax with group_limited_greedy (a group scores its best expert), scaled weights.
    "v2_group": ("deepseek_v2", dict(n_group=4, topk_group=2, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                     scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
                                     max_position_embeddings=128), YARN_V2_LITE),
    # V3 without YaRN and without query LoRA.
    "v3_plain": ("deepseek_v3", dict(q_lora_rank=None, n_group=2, topk_group=1, topk_method="noaux_tc",
                                     scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.5), None),
}


def official_config(variant: str, **overrides) -> dict:
    """config.json contents as DeepSeek's checkpoints write them."""
    model_type, fields, rope = VARIANTS[variant]
    config = {**BASE, **fields, "model_type": model_type, "rope_theta": 10000.0,
              "rope_scaling": copy.deepcopy(rope), "num_nextn_predict_layers": 0}
    config.update(overrides)
    return config


def hf_config(config: dict, rope_interleave: bool = True):
    """The transformers config of an official config.json dict (rope settings moved to rope_parameters)."""
    fields = {k: v for k, v in config.items() if k not in ("model_type", "rope_scaling", "rope_theta",
                                                            "scoring_func", "num_nextn_predict_layers")}
    fields["num_key_value_heads"] = config["num_attention_heads"]  # MLA: every head has its own key
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if config.get("rope_scaling"):
        scaling = {k: v for k, v in config["rope_scaling"].items() if k != "type"}
        rope = {"rope_type": "yarn", "rope_theta": config["rope_theta"], **scaling}
    if config["model_type"] == "deepseek_v3":
        fields.pop("topk_method", None)  # V3 in transformers always routes noaux_tc
        return DeepseekV3Config(**fields, rope_parameters=rope, rope_interleave=rope_interleave, num_mtp_layers=0,
                                attn_implementation="eager")
    return DeepseekV2Config(**fields, rope_parameters=rope, attn_implementation="eager")


def build_hf_model(config: dict, seed: int, rope_interleave: bool = True) -> torch.nn.Module:
    """A transformers model of `config` in float32 with random weights, eval mode.

    Linear weights are N(0, 1/in) so activations keep their scale through the layers;
    norms are 1 + N(0, 0.1) so a wrong norm weight shows; the V3 correction bias is
    N(0, 0.05), large enough to change which experts are picked.
    """
    hf = hf_config(config, rope_interleave)
    cls = DeepseekV3ForCausalLM if config["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(hf).eval()
    model.config._experts_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=generator))
    return model


def to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """The model in bfloat16, the V3 correction bias kept in float32 as transformers loads it."""
    model.to(torch.bfloat16)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()
    return model


def interleave_rope_rows(weight: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Reorder the rope rows of a [heads * head_dim, in] weight from halves (x0..x{r/2-1}, y0..) to pairs (x0, y0, ...).

    transformers with rope_interleave=False expects halves; DeepSeek's checkpoints store pairs.
    """
    w = weight.view(-1, head_dim, weight.shape[-1]).clone()
    rope = w[:, head_dim - rope_dim:]
    first, second = rope[:, : rope_dim // 2], rope[:, rope_dim // 2:]
    w[:, head_dim - rope_dim:] = torch.stack((first, second), dim=2).flatten(1, 2)
    return w.view(weight.shape)


def official_tensors(model: torch.nn.Module, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under the official checkpoint's names, in float32.

    Fused transformers experts (gate_up_proj [E, 2I, D], down_proj [E, D, I]) become
    per-expert gate_proj/up_proj/down_proj; with rope_interleave=False the rope rows of
    the query and kv_a projections are put back in DeepSeek's interleaved order.
    """
    c = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().float().clone()
        fused = re.fullmatch(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if fused:
            prefix, kind = fused.groups()
            for e in range(tensor.shape[0]):
                if kind == "gate_up_proj":
                    gate, up = tensor[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
            continue
        if not rope_interleave:
            if name.endswith(("q_proj.weight", "q_b_proj.weight")):
                tensor = interleave_rope_rows(tensor, c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_rope_head_dim)
            elif name.endswith("kv_a_proj_with_mqa.weight"):
                tensor = interleave_rope_rows(tensor, tensor.shape[0], c.qk_rope_head_dim)
        out[name] = tensor
    return out


def is_quantized(name: str) -> bool:
    """Whether the official FP8 checkpoint stores this tensor as e4m3fn + weight_scale_inv (every projection)."""
    return re.search(r"_proj(_with_mqa)?\.weight$", name) is not None


def to_checkpoint_dtypes(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """fp32 tensors -> "fp32", "bf16" or "fp8" storage (fp8: linears block-quantized, the rest bf16, bias fp32)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias") or dtype == "fp32":
            out[name] = t.float()
        elif dtype == "fp8" and is_quantized(name):
            out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = quantize_blocks(t)
        else:
            out[name] = t.to(torch.bfloat16)
    return out


def dequantized(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 weights as an FP8 checkpoint defines them: weight[r, c] x scale_inv[r // 128, c // 128]."""
    out = {}
    for name, t in stored.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = stored.get(name.removesuffix("weight") + "weight_scale_inv")
        if scale is None:
            out[name] = t.float()
        else:
            rows, cols = t.shape
            out[name] = t.float() * scale[torch.arange(rows)[:, None] // 128, torch.arange(cols)[None, :] // 128]
    return out


def load_official_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy official-layout float weights back into a transformers model (re-fusing its experts)."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, target in params.items():
            fused = re.fullmatch(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)", name)
            if fused:
                prefix, kind = fused.groups()
                if kind == "gate_up_proj":
                    value = torch.stack([torch.cat((tensors[f"{prefix}.{e}.gate_proj.weight"],
                                                    tensors[f"{prefix}.{e}.up_proj.weight"]))
                                         for e in range(target.shape[0])])
                else:
                    value = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(target.shape[0])])
                target.copy_(value)
            elif name in tensors:
                target.copy_(tensors[name])
            elif "rotary_emb" not in name:
                raise KeyError(f"no official tensor for {name}")


def save_official(path: Path, tensors: dict[str, torch.Tensor], config: dict, dtype: str = "fp32",
                  max_shard_bytes: int = 64 << 10) -> Path:
    """Write a checkpoint directory in the official layout (several shards, an index, config.json)."""
    stored = to_checkpoint_dtypes(tensors, dtype)
    config = dict(config)
    if dtype == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    return save_checkpoint(path, stored, config, max_shard_bytes=max_shard_bytes)


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, T, V] of a transformers model, no cache."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())


def fake_quantize_activation(x: torch.Tensor, max_value: float = 448.0) -> torch.Tensor:
    """x rounded as DeepSeek's dynamic FP8 activations are, then dequantized (float32).

    Per token per 128 channels: s = max(amax, 1e-4) / 448, q = e4m3fn(x / s), back to q * s.
    """
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x.float(), (0, -k % 128)).unflatten(-1, (-1, 128))
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-4) / max_value
    q = (blocks / scale).clamp(-max_value, max_value).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2)[..., :k].to(x.dtype)


class ActivationFakeQuant:
    """While active, the *_proj linears of a transformers DeepSeek model (experts included) see
    FP8-rounded inputs, as in DeepSeek's FP8 inference; the router, lm_head and kv_b_proj (which
    FP8 inference dequantizes and absorbs into attention) stay exact."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.handles, self.patched = model, [], []

    def __enter__(self):
        for name, module in self.model.named_modules():
            projection = re.search(r"_proj(_with_mqa)?$", name) and "kv_b_proj" not in name
            if isinstance(module, torch.nn.Linear) and projection:
                self.handles.append(module.register_forward_pre_hook(
                    lambda mod, args: (fake_quantize_activation(args[0]),) + args[1:]))
            elif name.endswith("mlp.experts"):
                self.patched.append(module)
                module.forward = _fake_quant_experts_forward.__get__(module)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for module in self.patched:
            del module.forward


def _fake_quant_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The fused-experts forward of transformers, with FP8-rounded GEMM inputs."""
    out = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        token, slot = torch.where(top_k_index == expert)
        gate, up = torch.nn.functional.linear(fake_quantize_activation(hidden_states[token]),
                                              self.gate_up_proj[expert]).chunk(2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * up
        y = torch.nn.functional.linear(fake_quantize_activation(hidden), self.down_proj[expert])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def mtp_tensors(model: torch.nn.Module, donor: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of one MTP module (layer index num_hidden_layers) in the official layout.

    Its transformer block is the last layer of `donor` (another random model of the same config);
    enorm, hnorm, eh_proj and shared_head.norm are new random tensors; embed_tokens and
    shared_head.head repeat the main model's embedding and lm_head, as in DeepSeek-V3.
    """
    c = model.config
    index, d = c.num_hidden_layers, c.hidden_size
    p = f"model.layers.{index}"
    generator = torch.Generator().manual_seed(seed)
    donor_prefix = f"model.layers.{c.num_hidden_layers - 1}."
    out = {p + "." + name.removeprefix(donor_prefix): t for name, t in official_tensors(donor).items()
           if name.startswith(donor_prefix)}
    out[f"{p}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    out[f"{p}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{p}.{name}.weight"] = 1 + 0.1 * torch.randn(d, generator=generator)
    out[f"{p}.eh_proj.weight"] = torch.randn(d, 2 * d, generator=generator) * (2 * d) ** -0.5
    return out


def hf_mtp_logits(model: torch.nn.Module, tensors: dict[str, torch.Tensor], tokens: torch.Tensor,
                  next_tokens: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP module computed with transformers' own decoder layer (float32).

    h = final-norm hidden state of the main model at each position; x = eh_proj([enorm(embed(next)),
    hnorm(h)]); x = decoder layer(x) (causal, same rotary positions); logits = head(norm(x)).
    """
    c = model.config
    p = f"model.layers.{c.num_hidden_layers}."

    def weight(name):
        return tensors[p + name + ".weight"]

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    layer_cls = type(model.model.layers[-1])
    layer = layer_cls(c, layer_idx=c.num_hidden_layers).eval()
    load_official_into(layer, {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)})
    with torch.no_grad():
        hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state
        embedded = torch.nn.functional.embedding(next_tokens, weight("embed_tokens"))
        x = torch.nn.functional.linear(torch.cat((rms(embedded, weight("enorm")), rms(hidden, weight("hnorm"))), -1),
                                       weight("eh_proj"))
        t = tokens.shape[1]
        positions = torch.arange(t)[None].expand(tokens.shape)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))
        x = x[0] if isinstance(x, tuple) else x
        return torch.nn.functional.linear(rms(x, weight("shared_head.norm")), weight("shared_head.head"))
