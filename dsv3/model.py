"""The DeepSeek-V3 model: MLA with YaRN RoPE, DeepSeekMoE, MTP, on any backend.

Reads bottom-up: rotary tables, the flat batch, the linear wrapper, MLA, MLP, MoE,
Block, MTP, Transformer. Every heavy op goes through the backend object passed in;
this file never looks at the hardware.

The latent cache is a pool of fixed-size blocks per layer; one forward runs a flat
batch of tokens from many sequences (decode tokens first, then prefill chunks), each
sequence reading and writing its blocks through its block table. Who runs, and in
which blocks, is the serving engine's business (dsv3/serving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3.backends.interface import (
    DENSE_DTYPES,
    Backend,
    LinearWeight,
    MLAInputs,
    NormOutput,
    PagedBatch,
    Precision,
    QuantizedActivation,
    RoutingConfig,
    plain,
)
from dsv3.backends.latent_cache import CacheSpec
from dsv3.checkpoint import WeightLoader
from dsv3.checks import token_batch
from dsv3.config import ModelConfig, yarn_get_mscale
from dsv3.errors import Dsv3Error

#: the activation dtype of each precision: the dense dtype, and bf16 around FP8 linears
ACTIVATION_DTYPES = {"fp8": torch.bfloat16, **DENSE_DTYPES}


def rope_tables(config: ModelConfig, max_seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_seq_len, rope_dim/2] with YaRN frequency interpolation and mscale.

    YaRN keeps high frequencies (rotating more than beta_fast times over the original
    context) as they are, divides low ones (fewer than beta_slow rotations) by the
    factor, ramps linearly between, and scales cos/sin by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    attention_factor = 1.0
    y = config.rope_scaling
    if y:
        factor, original = y["factor"], y["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(y.get("beta_fast", 32))), 0)
        high = min(math.ceil(correction_dim(y.get("beta_slow", 1))), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        attention_factor = (yarn_get_mscale(factor, y.get("mscale", 1))
                            / yarn_get_mscale(factor, y.get("mscale_all_dim", 0)))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return (angles.cos() * attention_factor).to(device), (angles.sin() * attention_factor).to(device)


@dataclass
class ForwardBatch:
    """A flat batch of new tokens from several sequences: decode tokens first (one per sequence), then
    prefill chunks (several tokens per sequence, possibly after a cached prefix).

    Attributes:
        tokens: int64 [N] token ids.
        positions: int64 [N] their positions in their sequences.
        num_decode_tokens: how many of the first tokens are decodes (host int).
        decode: where the decoding sequences' tokens live (None without decodes).
        prefill: where the prefilling sequences' tokens live; its query_start counts from the first
            prefill token (None without prefills).
        logits_indices: int64 [S] rows whose logits are wanted (None: every row).
        dp_num_tokens: under data-parallel attention, the token count of every DP group's batch this step
            (host ints, the same tuple on every rank; this rank's group's entry is num_tokens); None otherwise.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    num_decode_tokens: int
    decode: PagedBatch | None
    prefill: PagedBatch | None
    logits_indices: torch.Tensor | None = None
    dp_num_tokens: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


class Linear:
    """A linear layer whose weight the backend prepared; y = x @ W^T."""

    def __init__(self, backend: Backend, weight: LinearWeight):
        self.backend, self.weight = backend, weight

    @classmethod
    def load(cls, backend: Backend, loader: WeightLoader, module: str, precision: Precision) -> "Linear":
        w, scale = loader.linear(module)
        return cls(backend, backend.prepare_linear(w, scale, precision))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight)


class FusedLinear:
    """Linears that read the same input (q_a + kv_a, gate + up), run as one GEMM where their weights stack.

    One launch and one activation quantization instead of several; the output is split back. The
    weights stack where they have the same kind and every part but the last ends on a 128-row block
    (so FP8 block scales stack too, and a dense weight quantized at load gets the blocks it would
    get alone); otherwise each part stays its own linear.
    """

    def __init__(self, backend: Backend, loader: WeightLoader, modules: list[str], precision: Precision):
        parts = [loader.linear(m) for m in modules]
        self.sizes = [w.shape[0] for w, _ in parts]
        if _stackable(parts):
            scales = [s for _, s in parts]
            stacked = (torch.cat([w for w, _ in parts]), None if scales[0] is None else torch.cat(scales))
            parts = [stacked]
        self.linears = [Linear(backend, backend.prepare_linear(w, s, precision)) for w, s in parts]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self.linears) == 1:
            return list(self.linears[0](x).split(self.sizes, dim=-1))
        return [linear(x) for linear in self.linears]


def _stackable(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> bool:
    if len({(w.dtype, w.shape[1], w.device) for w, _ in parts}) != 1 or len({s is None for _, s in parts}) != 1:
        return False
    return all(w.shape[0] % 128 == 0 for w, _ in parts[:-1])


class RMSNorm:
    """RMSNorm; `quantize` where only FP8 linears (and the router, which reads the values) take the result:
    a backend that can then hands on the FP8 copy too (NormOutput.activation), and the linears skip their own
    quantization."""

    def __init__(self, backend: Backend, weight: torch.Tensor, eps: float, quantize: bool = False):
        self.backend, self.weight, self.eps, self.quantize = backend, weight, eps, quantize

    @classmethod
    def load(cls, backend: Backend, loader: WeightLoader, module: str, eps: float, dtype: torch.dtype,
             quantize: bool = False) -> "RMSNorm":
        return cls(backend, loader.tensor(module).to(backend.device, dtype), eps, quantize)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormOutput:
        return self.backend.rms_norm(x, self.weight, self.eps, residual, quantize=self.quantize)


class MLA:
    """Multi-head latent attention with the absorbed latent cache.

    Per token the cache keeps the normalized latent (kv_lora_rank) and the rotated
    shared rope key (qk_rope_head_dim), never per-head keys and values.
    """

    def __init__(self, config: ModelConfig, backend: Backend, loader: WeightLoader, prefix: str,
                 precision: Precision, dtype: torch.dtype):
        c = config
        self.backend, self.config = backend, c
        self.num_heads = c.num_attention_heads
        # one GEMM for the two projections of the block's input: q_a and kv_a, or (V2-Lite, no q_lora_rank)
        # q and kv_a; under TP the loader hands q_proj's rows of this rank, and the split follows its size
        first = f"{prefix}.q_proj" if c.q_lora_rank is None else f"{prefix}.q_a_proj"
        self.qkv_a_proj = FusedLinear(backend, loader, [first, f"{prefix}.kv_a_proj_with_mqa"], precision)
        if c.q_lora_rank is not None:
            self.q_a_norm = RMSNorm.load(backend, loader, f"{prefix}.q_a_layernorm", c.rms_norm_eps, dtype,
                                         quantize=precision == "fp8")
            self.q_b_proj = Linear.load(backend, loader, f"{prefix}.q_b_proj", precision)
        self.kv_a_norm = RMSNorm.load(backend, loader, f"{prefix}.kv_a_layernorm", c.rms_norm_eps, dtype)
        kv_b, kv_b_scale = loader.linear(f"{prefix}.kv_b_proj")
        # dequantized to the activation dtype, as a BF16 checkpoint would store it
        kv_b_dense = backend.prepare_linear(kv_b, kv_b_scale, "fp32" if dtype == torch.float32 else "bf16").weight
        self.absorbed = backend.prepare_mla(kv_b_dense, self.num_heads, c.qk_nope_head_dim, c.v_head_dim, dtype)
        self.o_proj = Linear.load(backend, loader, f"{prefix}.o_proj", precision)
        self.softmax_scale = c.softmax_scale()

    def __call__(self, x: torch.Tensor | QuantizedActivation, cache: torch.Tensor, batch: ForwardBatch,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]; writes this layer's cache for the batch's tokens.

        Decode tokens go to mla_decode, which rotates q_pe and k_pe itself (a fused backend as it writes
        the cache); prefill chunks are rotated here and go to mla_prefill.
        """
        c, n = self.config, x.shape[0]
        q, kv_a = self.qkv_a_proj(x)
        if c.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_norm(q).activation)
        q = q.view(n, self.num_heads, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_pe = kv_a.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_norm(latent).values
        d = batch.num_decode_tokens
        outs = []
        if d:
            inputs = MLAInputs(q_nope[:d], q_pe[:d], latent[:d], k_pe[:d])
            outs.append(self.backend.mla_decode(inputs, cache, batch.decode, self.absorbed, self.softmax_scale,
                                                rope=(cos[:d], sin[:d])))
        if d < n:
            rot_cos, rot_sin = cos[None, d:], sin[None, d:]
            inputs = MLAInputs(q_nope[d:], self.backend.rotary(q_pe[None, d:], rot_cos, rot_sin)[0], latent[d:],
                               self.backend.rotary(k_pe[None, d:], rot_cos, rot_sin)[0])
            outs.append(self.backend.mla_prefill(inputs, cache, batch.prefill, self.absorbed, self.softmax_scale))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(out.flatten(1))


class MLP:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, backend: Backend, loader: WeightLoader, prefix: str, precision: Precision):
        self.gate_up_proj = FusedLinear(backend, loader, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], precision)
        self.down_proj = Linear.load(backend, loader, f"{prefix}.down_proj", precision)
        self.backend = backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.backend.swiglu(*self.gate_up_proj(x)))


class MoE:
    """DeepSeekMoE: routed experts picked per token by the backend's routing, plus shared experts."""

    def __init__(self, config: ModelConfig, backend: Backend, loader: WeightLoader, prefix: str, precision: Precision):
        c = config
        self.backend = backend
        self.routing = RoutingConfig(scoring=c.scoring_func, method=c.topk_method, top_k=c.num_experts_per_tok,
                                     num_groups=c.n_group, topk_groups=c.topk_group, normalize=c.norm_topk_prob,
                                     scaling=c.routed_scaling_factor)
        self.gate_weight = loader.tensor(f"{prefix}.gate").to(backend.device, torch.float32)
        self.bias = None
        if c.topk_method == "noaux_tc":
            self.bias = loader.tensor(f"{prefix}.gate.e_score_correction_bias").to(backend.device, torch.float32)
        self.experts = backend.prepare_experts(*loader.experts(prefix, c.n_routed_experts), precision)
        self.shared = MLP(backend, loader, f"{prefix}.shared_experts", precision) if c.n_shared_experts else None

    def __call__(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        flat = plain(x).reshape(-1, x.shape[-1])
        # the router reads the values; the experts take the FP8 copy where one came (already [N, D])
        inp = QuantizedActivation(flat, x.q, x.scales) if isinstance(x, QuantizedActivation) else flat
        weights, ids = self.backend.moe_route(flat, self.gate_weight, self.bias, self.routing)
        out = self.backend.moe_experts(inp, weights, ids, self.experts)
        if self.shared is not None:
            out = out + self.shared(inp)
        return out.view(x.shape)


class Block:
    """Pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(...)); FFN is MLP or MoE."""

    def __init__(self, config: ModelConfig, backend: Backend, loader: WeightLoader, index: int,
                 precision: Precision, dtype: torch.dtype, moe: bool):
        p = f"model.layers.{index}"
        eps = config.rms_norm_eps
        fp8 = precision == "fp8"  # both norms feed FP8 linears only (and the router)
        self.attn_norm = RMSNorm.load(backend, loader, f"{p}.input_layernorm", eps, dtype, quantize=fp8)
        self.attn = MLA(config, backend, loader, f"{p}.self_attn", precision, dtype)
        self.ffn_norm = RMSNorm.load(backend, loader, f"{p}.post_attention_layernorm", eps, dtype, quantize=fp8)
        self.ffn = (MoE(config, backend, loader, f"{p}.mlp", precision) if moe
                    else MLP(backend, loader, f"{p}.mlp", precision))

    def __call__(self, x, residual, cache, batch, cos, sin):
        """Returns (block output, residual stream); the residual add is fused into the next norm."""
        normed = self.attn_norm(x, residual)
        normed = self.ffn_norm(self.attn(normed.activation, cache, batch, cos, sin), normed.residual)
        return self.ffn(normed.activation), normed.residual


class MTP:
    """The multi-token-prediction module: predicts token t+2 from the hidden state at t and token t+1."""

    def __init__(self, config: ModelConfig, backend: Backend, loader: WeightLoader, index: int,
                 precision: Precision, dtype: torch.dtype):
        p = f"model.layers.{index}"
        eps = config.rms_norm_eps
        self.embed = loader.tensor(f"{p}.embed_tokens").to(backend.device, dtype)
        self.enorm = RMSNorm.load(backend, loader, f"{p}.enorm", eps, dtype)
        self.hnorm = RMSNorm.load(backend, loader, f"{p}.hnorm", eps, dtype)
        self.eh_proj = Linear.load(backend, loader, f"{p}.eh_proj", precision)
        self.block = Block(config, backend, loader, index, precision, dtype, moe=config.n_routed_experts is not None)
        self.norm = RMSNorm.load(backend, loader, f"{p}.shared_head.norm", eps, dtype)
        self.head = loader.tensor(f"{p}.shared_head.head").to(backend.device, dtype)

    def __call__(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The module's normed hidden state [N, D] at each of the batch's positions, from the hidden state
        there `hidden` [N, D] and the following token `next_tokens` [N]; writes its own cache.

        Its output stands in for the main model's hidden state at the next position, so applying the module
        again to it and its predicted token drafts one more token (as vLLM does for k > 1)."""
        embedded = F.embedding(next_tokens, self.embed)
        x = self.eh_proj(torch.cat((self.enorm(embedded).values, self.hnorm(hidden).values), dim=-1))
        x, residual = self.block(x, None, cache, batch, cos, sin)
        return self.norm(x, residual).values

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the module's hidden states."""
        return F.linear(hidden, self.head).float()


class Transformer:
    """DeepSeek-V3: embedding, blocks (dense first, then MoE), final norm, head; optional MTP.

    The latent cache is a pool of fixed-size blocks per layer (allocate_cache); each forward runs a
    flat batch of tokens from several sequences through their block tables (ForwardBatch).

    Args:
        config: model config.
        backend: the backend every heavy op runs on.
        loader: where weights come from (a checkpoint or synthetic).
        precision: "fp8" (block-scaled FP8 linears), "bf16" or "fp32".
        max_model_len: the longest sequence (prompt and output) the model will run.
        load_mtp: also load the MTP module (layer index num_hidden_layers).
    """

    def __init__(self, config: ModelConfig, backend: Backend, loader: WeightLoader, precision: Precision,
                 max_model_len: int, load_mtp: bool = False):
        self.config, self.backend, self.precision = config, backend, precision
        backend.ue8m0 = config.ue8m0_scales  # the checkpoint's activation scale format (DeepSeek-V3.1's ue8m0)
        self.dtype = dtype = ACTIVATION_DTYPES[precision]
        self.max_model_len = max_model_len
        device = backend.device
        self.embed = loader.tensor("model.embed_tokens").to(device, dtype)
        self.layers = [Block(config, backend, loader, i, precision, dtype, config.is_moe_layer(i))
                       for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm.load(backend, loader, "model.norm", config.rms_norm_eps, dtype)
        self.head = self.embed if config.tie_word_embeddings else loader.tensor("lm_head").to(device, dtype)
        self.mtp = [MTP(config, backend, loader, config.num_hidden_layers + j, precision, dtype)
                    for j in range(config.num_nextn_predict_layers)] if load_mtp else []
        self.cos, self.sin = rope_tables(config, max_model_len, device)
        self.cache_spec: CacheSpec | None = None
        self.caches: list[torch.Tensor] = []
        #: the latent cache type of the pools allocate_cache made: "auto" (the activation dtype), "bf16" or "fp8"
        self.kv_cache_dtype = "auto"

    # ---- the paged cache -------------------------------------------------------------------------

    def cache_spec_for(self, num_blocks: int, block_size: int, kv_cache_dtype: str | None = None) -> CacheSpec:
        """One layer's pool of `num_blocks` blocks, as the backend lays it out for `kv_cache_dtype` ("auto",
        "bf16" or "fp8"; None: the type of the pools allocate_cache made)."""
        return self.backend.mla_cache_spec(num_blocks, block_size, self.config.kv_lora_rank,
                                           self.config.qk_rope_head_dim, self.dtype,
                                           kv_cache_dtype or self.kv_cache_dtype)

    def cache_bytes_per_block(self, block_size: int, kv_cache_dtype: str | None = None) -> int:
        """Bytes one block takes over all layers (the MTP module's, where loaded, included: speculative
        decoding gives it a pool of its own)."""
        return (self.cache_spec_for(1, block_size, kv_cache_dtype).bytes_per_block
                * (len(self.layers) + len(self.mtp)))

    def allocate_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> None:
        """Allocate each layer's pool of `num_blocks` blocks of `block_size` tokens (replacing any), of the
        latent cache type `kv_cache_dtype`."""
        self.caches = []
        self.kv_cache_dtype = kv_cache_dtype
        self.cache_spec = self.cache_spec_for(num_blocks, block_size)
        self.caches = [self.backend.allocate_mla_cache(self.cache_spec) for _ in self.layers]

    def _scratch_caches(self, num_sequences: int, length: int, layers: int,
                        kv_cache_dtype: str | None = None) -> tuple[list[torch.Tensor], PagedBatch]:
        """Pools of their own for `num_sequences` sequences of `length` tokens from position 0, and the
        batch that prefills them (block 0 unused, as in the engine's pools)."""
        device = self.backend.device
        block_size = min(64, length)
        per_seq = -(-length // block_size)
        spec = self.cache_spec_for(1 + num_sequences * per_seq, block_size, kv_cache_dtype)
        caches = [self.backend.allocate_mla_cache(spec) for _ in range(layers)]
        tables = 1 + torch.arange(num_sequences * per_seq, device=device, dtype=torch.int32).view(num_sequences, -1)
        batch = PagedBatch(block_tables=tables,
                           seq_lens=torch.full((num_sequences,), length, dtype=torch.int32, device=device),
                           query_start=torch.arange(0, num_sequences * length + 1, length, dtype=torch.int32,
                                                    device=device),
                           max_query_len=length, max_seq_len=length)
        return caches, batch

    def supports_graphs(self) -> bool:
        """Whether a decode step may be recorded (backend.graph_runner) and replayed."""
        return True

    def runs_in_lockstep(self) -> bool:
        """Whether other processes run this model's every step with it (tensor/expert parallel ranks), so that
        steps must come in the same order on every rank."""
        return False

    # ---- forward -------------------------------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, D] for tokens [N]."""
        return F.embedding(tokens, self.embed)

    def hidden(self, batch: ForwardBatch, caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final-norm hidden states [N, D] of the batch's tokens; writes their latents to the caches."""
        caches = self.caches if caches is None else caches
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        x, residual = self.embed_tokens(batch.tokens), None
        for layer, cache in zip(self.layers, caches, strict=True):
            x, residual = layer(x, residual, cache, batch, cos, sin)
        return self.norm(x, residual).values

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits from final hidden states."""
        return F.linear(hidden, self.head).float()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Float32 logits [S, V] of the rows batch.logits_indices (every row when None)."""
        h = self.hidden(batch, caches)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        return self.project(h)

    def _whole_sequences(self, tokens: torch.Tensor, layers: int,
                         kv_cache_dtype: str | None = None) -> tuple[ForwardBatch, list[torch.Tensor]]:
        """tokens [B, T] from position 0 as one prefill batch over scratch pools of their own (of the engine's
        latent cache type where kv_cache_dtype is None)."""
        b, t = tokens.shape
        if t > self.max_model_len:
            raise Dsv3Error(f"tokens {list(tokens.shape)}: {t} positions exceed max_model_len={self.max_model_len}")
        tokens = tokens.to(self.backend.device)
        caches, paged = self._scratch_caches(b, t, layers, kv_cache_dtype)
        positions = torch.arange(t, device=tokens.device).repeat(b)
        return ForwardBatch(tokens.reshape(-1), positions, 0, None, paged), caches

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, V] of a whole batch of sequences from position 0 (the engine's cache untouched)."""
        tokens = token_batch(tokens, self.config.vocab_size)
        batch, caches = self._whole_sequences(tokens, len(self.layers))
        return self.forward(batch, caches).view(*tokens.shape, -1)

    @torch.inference_mode()
    def mtp_logits(self, tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the MTP module [B, T, V]: from the main model's hidden state at each position of
        `tokens` [B, T] (from position 0) and the embedding of the following token `next_tokens` [B, T]."""
        if not self.mtp:
            raise Dsv3Error("the MTP module was not loaded (load_model(..., load_mtp=True))")
        tokens, next_tokens = (token_batch(t, self.config.vocab_size) for t in (tokens, next_tokens))
        batch, caches = self._whole_sequences(tokens, len(self.layers) + 1)
        h = self.hidden(batch, caches[:-1])
        mtp = self.mtp[0]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        x = mtp(h, next_tokens.reshape(-1).to(h.device), caches[-1], batch, cos, sin)
        return mtp.project(x).view(*tokens.shape, -1)
