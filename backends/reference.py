"""The reference backend: plain PyTorch on any device, written for clarity.

It is the oracle every other backend is compared with. FP8 is emulated
exactly: activations are quantized per token per 128 channels, each 128-wide
K block is multiplied in fp32 and scaled by a_scale x b_scale, and the blocks
are summed in fp32. Attention and routing run in fp32 whatever the model dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import (
    Backend,
    Capabilities,
    ExpertWeights,
    LinearWeight,
    MLAInputs,
    MLAWeights,
    NormOutput,
    PagedBatch,
    Precision,
    RoutingConfig,
    plain,
)
from dsv3.backends.latent_cache import (
    CacheSpec,
    dense_cache_dtype,
    fp8_latent_cache_spec,
    is_fp8_cache,
    paged_cache_spec,
    read_fp8_cache,
    write_fp8_cache,
)


class ReferenceBackend(Backend):
    """Plain-PyTorch backend.

    Args:
        device: any torch device ("cpu" by default).
        fp8_format: "e4m3fn" (NVIDIA, the checkpoint's) or "e4m3fnuz" (MI300X numerics).
        fp8_max: the value activation amax maps to; defaults to 448 for fn and 224 for fnuz.
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
        chip: accepted like every backend's; unused (pass fp8_format to emulate a chip's FP8).
    """

    def __init__(self, device: str | torch.device | None = None, fp8_format: str = "e4m3fn",
                 fp8_max: float | None = None, ue8m0: bool = False, chip=None):
        device = "cpu" if device is None else device
        if fp8_format not in fp8.FP8_FORMATS:
            raise BackendError(f"fp8_format must be one of {sorted(fp8.FP8_FORMATS)}, got {fp8_format!r}")
        dtype = fp8.FP8_FORMATS[fp8_format]
        if fp8_max is None:
            fp8_max = fp8.FP8_ACTIVATION_MAX[fp8_format]
        self.ue8m0 = ue8m0
        self.capabilities = Capabilities(
            name="reference",
            device=str(torch.device(device)),
            fp8_dtype=dtype,
            fp8_max=fp8_max,
            dist_backend="gloo" if torch.device(device).type == "cpu" else "nccl",
            ops={
                "linear_fp8": f"torch: {fp8_format} emulated, fp32 per 128-block",
                "linear_bf16": "torch: F.linear",
                "rms_norm": "torch: fp32",
                "rotary": "torch: fp32 interleaved",
                "swiglu": "torch: silu, then the product",
                "mla_prefill": "torch: absorbed, fp32 softmax; FP8 latent cache emulated exactly",
                "mla_decode": "torch: absorbed, fp32 softmax; FP8 latent cache emulated exactly",
                "moe_route": "torch: fp32",
                "moe_experts": "torch: loop over experts",
            },
        )

    # ---- weight preparation ------------------------------------------------

    def _to_fp8(self, weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight in this backend's FP8 format with block scales, from FP8 or dense input."""
        if scale is None:
            return fp8.quantize_blocks(weight, self.capabilities.fp8_dtype)
        if self.capabilities.fp8_dtype == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
            return fp8.fn_to_fnuz(weight, scale.float())
        return weight, scale.float()

    def _prepare(self, weight, scale, precision):
        if precision == "fp8":
            return self._to_fp8(weight.to(self.device), None if scale is None else scale.to(self.device))
        return self.dense_weight(weight.to(self.device), None if scale is None else scale.to(self.device),
                                 precision), None

    def prepare_linear(self, weight, scale_inv, precision: Precision) -> LinearWeight:
        w, s = self._prepare(weight, scale_inv, precision)
        return LinearWeight(w, s, weight.shape[0], weight.shape[1])

    def prepare_experts(self, gate_up, gate_up_scale, down, down_scale, precision: Precision) -> ExpertWeights:
        gu, gus = self._prepare(gate_up, gate_up_scale, precision)
        d, ds = self._prepare(down, down_scale, precision)
        return ExpertWeights(gu, gus, d, ds)

    def prepare_mla(self, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, dtype) -> MLAWeights:
        w = kv_b_weight.to(self.device, torch.float32).view(num_heads, qk_nope_head_dim + v_head_dim, -1)
        return MLAWeights(w_uk=w[:, :qk_nope_head_dim].contiguous(), w_uv=w[:, qk_nope_head_dim:].contiguous())

    # ---- GEMM --------------------------------------------------------------

    def _fp8_matmul(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [M, K] (float) @ FP8 weight [N, K]^T with 1x128 activation and 128x128 weight blocks."""
        qa, sa = self.quantize_activation(x)
        return fp8.block_scaled_matmul(qa, sa, weight, scale)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] @ weight^T in x's dtype, FP8-emulated when `scale` is given."""
        if scale is None:
            return F.linear(x, weight.to(x.dtype))
        return self._fp8_matmul(x, weight, scale).to(x.dtype)

    def linear(self, x, weight: LinearWeight):
        x = plain(x)
        y = self._matmul(x.reshape(-1, x.shape[-1]), weight.weight, weight.scale)
        return y.view(*x.shape[:-1], weight.out_features)

    # ---- small ops ---------------------------------------------------------

    def rms_norm(self, x, weight, eps, residual=None, quantize=False):
        if residual is not None:
            x = x + residual
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return NormOutput(weight.to(x.dtype) * normed.to(x.dtype), x)

    def rotary(self, x, cos, sin):
        extra = x.dim() - cos.dim()
        cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1])
        sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1])
        xf = x.float()
        even, odd = xf[..., 0::2], xf[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    # ---- MLA ---------------------------------------------------------------

    def mla_cache_spec(self, num_blocks, block_size, kv_lora_rank, rope_dim, dtype,
                       kv_cache_dtype="auto") -> CacheSpec:
        if kv_cache_dtype == "fp8":
            return fp8_latent_cache_spec(num_blocks, block_size, kv_lora_rank, rope_dim, dtype,
                                         self.capabilities.fp8_dtype)
        return paged_cache_spec(num_blocks, block_size, kv_lora_rank, rope_dim,
                                dense_cache_dtype(kv_cache_dtype, dtype))

    def allocate_mla_cache(self, spec: CacheSpec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=self.device)

    def _write(self, inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch) -> None:
        seq, position = batch.token_positions(inputs.latent.shape[0])
        rows = batch.cache_rows(seq, position, cache.shape[1])
        if is_fp8_cache(cache):
            write_fp8_cache(cache, rows, inputs.latent, inputs.k_pe)
        else:
            cache.view(-1, cache.shape[-1])[rows] = torch.cat((inputs.latent, inputs.k_pe), -1).to(cache.dtype)

    @staticmethod
    def _reader(inputs: MLAInputs, cache: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Pool rows -> their values: the rows themselves, or an FP8 cache's dequantized in fp32."""
        if is_fp8_cache(cache):
            rank, rope_dim = inputs.latent.shape[-1], inputs.k_pe.shape[-1]
            return lambda rows: read_fp8_cache(cache, rows, rank, rope_dim, inputs.k_pe.dtype)
        pool = cache.view(-1, cache.shape[-1])
        return lambda rows: pool[rows]

    def mla_prefill(self, inputs, cache, batch, weights, softmax_scale):
        self._write(inputs, cache, batch)
        return paged_attention(inputs, self._reader(inputs, cache), batch, cache.shape[1], batch.max_query_len,
                               batch.max_seq_len, weights, softmax_scale)

    def mla_decode(self, inputs, cache, batch, weights, softmax_scale, rope=None):
        q_pe, k_pe = self.rotate_for_decode(inputs.q_pe, inputs.k_pe, rope)
        inputs = MLAInputs(inputs.q_nope, q_pe, inputs.latent, k_pe)
        self._write(inputs, cache, batch)
        span = batch.block_tables.shape[1] * cache.shape[1]  # every position a table can address: no sync
        return paged_attention(inputs, self._reader(inputs, cache), batch, cache.shape[1], 1, span, weights,
                               softmax_scale)

    # ---- MoE ---------------------------------------------------------------

    def moe_route(self, x, gate_weight, bias, config: RoutingConfig):
        return route_experts(F.linear(x.float(), gate_weight.float()), bias, config)

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        x = plain(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        inter = experts.intermediate_size
        for expert in ids.unique().tolist():
            if expert < 0:  # skipped pairs (see Backend.moe_experts)
                continue
            token, slot = (ids == expert).nonzero(as_tuple=True)
            gate_up = self._matmul(x[token], experts.gate_up[expert],
                                   None if experts.gate_up_scale is None else experts.gate_up_scale[expert])
            hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            y = self._matmul(hidden, experts.down[expert],
                             None if experts.down_scale is None else experts.down_scale[expert])
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)


def paged_attention(inputs: MLAInputs, read_rows: Callable[[torch.Tensor], torch.Tensor], batch: PagedBatch,
                    block_size: int, max_query_len: int, max_seq_len: int, weights: MLAWeights,
                    softmax_scale: float) -> torch.Tensor:
    """Absorbed MLA in fp32 over a paged cache whose new tokens are written already.

    Every sequence's first max_seq_len positions are gathered through its block table (rows at or past its
    seq_len are zeroed: a pool block may hold anything there) and its new tokens padded to max_query_len;
    token p attends over [0, p].

    Args:
        inputs: the N new tokens (q_pe rotated).
        read_rows: int64 pool rows [...] -> [..., C + R] cached values (pool row = block * block_size + offset).
        batch, block_size: the block tables and lengths, and tokens per block.
    Returns:
        [N, H, v_head_dim] in q_nope's dtype.
    """
    num_tokens, num_seqs = inputs.q_nope.shape[0], batch.num_seqs
    device = inputs.q_nope.device
    seq, position = batch.token_positions(num_tokens)
    key_pos = torch.arange(max_seq_len, device=device)
    seq_ids = torch.arange(num_seqs, device=device)[:, None].expand(num_seqs, max_seq_len)
    kv = read_rows(batch.cache_rows(seq_ids, key_pos[None, :].expand(num_seqs, -1), block_size)).float()
    kv = kv.masked_fill((key_pos[None, :] >= batch.seq_lens.long()[:, None])[..., None], 0)  # [B, S, C + R]

    slot = torch.arange(num_tokens, device=device) - batch.query_start.long()[seq]  # row within the sequence
    padded = [torch.zeros(num_seqs, max_query_len, *t.shape[1:], dtype=t.dtype, device=device)
              for t in (inputs.q_nope, inputs.q_pe)]
    query_pos = torch.zeros(num_seqs, max_query_len, dtype=torch.long, device=device)
    for dest, src in zip((*padded, query_pos), (inputs.q_nope, inputs.q_pe, position), strict=True):
        dest[seq, slot] = src
    allowed = key_pos[None, None, :] <= query_pos[..., None]  # padding queries see key 0 and are dropped

    rank = weights.w_uk.shape[-1]
    q_latent = torch.einsum("bthd,hdc->bthc", padded[0].float(), weights.w_uk.float())
    scores = (torch.einsum("bthc,bsc->bths", q_latent, kv[..., :rank])
              + torch.einsum("bthr,bsr->bths", padded[1].float(), kv[..., rank:])) * softmax_scale
    probs = scores.masked_fill(~allowed[:, :, None, :], float("-inf")).softmax(dim=-1)
    out_latent = torch.einsum("bths,bsc->bthc", probs, kv[..., :rank])
    out = torch.einsum("bthc,hvc->bthv", out_latent, weights.w_uv.float()).to(inputs.q_nope.dtype)
    return out[seq, slot]


def route_experts(logits: torch.Tensor, bias: torch.Tensor | None,
                  config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing from gate logits [N, E] (float32) to (weights [N, k], ids [N, k]).

    V3 (noaux_tc): sigmoid scores; the correction bias is added for selection only;
    a group's score is the sum of its two best biased scores; the best topk_groups
    groups stay; the top_k experts among them win; weights are the unbiased scores,
    normalized, times routed_scaling_factor. V2 (group_limited_greedy): softmax, a
    group scores its best expert. V2-Lite (greedy): softmax top-k.
    """
    if config.scoring == "sigmoid":
        scores = logits.sigmoid()
    elif config.scoring == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"unknown scoring function {config.scoring!r}")
    choice = scores if bias is None else scores + bias.float()
    if config.method in ("noaux_tc", "group_limited_greedy") and config.num_groups > 1:
        grouped = choice.view(choice.shape[0], config.num_groups, -1)
        if config.method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(config.topk_groups, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
    elif config.method not in ("noaux_tc", "group_limited_greedy", "greedy"):
        raise ValueError(f"unknown routing method {config.method!r}")
    ids = choice.topk(config.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if config.normalize and (config.top_k > 1 or config.scoring == "sigmoid"):  # V3 normalizes even one weight
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.scaling, ids
