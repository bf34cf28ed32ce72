"""MLA attention over a paged latent cache: a Triton flash-decoding kernel and an SDPA prefill.

The cache of one layer is a pool [num_blocks, block_size, kv_lora_rank + rope_dim]: per token
the normalized latent (C = 512 for DeepSeek-V3) followed by the rotated shared rope key
(R = 64), contiguous, so one token is one 1152-byte row in BF16. Token p of sequence b is row
p % block_size of block block_tables[b, p // block_size]. The FP8 latent cache (--kv-cache-dtype
fp8, latent_cache.fp8_latent_cache_spec) keeps the same blocks with 656-byte rows: the latent in FP8,
a float32 scale per 128 latent values, the rope key in BF16. Decode reads those bytes and
dequantizes in registers; every write quantizes as fp8.quantize_activation does.

Decode runs the absorbed form. The latent query q_nope @ w_uk ([B, H, C]) and the
rope query ([B, H, R]) meet every cached row of their sequence: scores use all
C + R columns, values are the latent itself, and one shared KV head serves all H
query heads, so each program multiplies a block of heads [BLOCK_H, C + R] by a KV
tile [C + R, BLOCK_N] whose rows it finds through the sequence's block table. The
sequence is split in num_splits pieces (flash-decoding): each program keeps an online
softmax over its piece and writes a partial output with its log-sum-exp; a second
kernel combines the pieces and, for few splits, applies w_uv in the same pass. Split
lengths follow each sequence's own length (seq_lens[b], read on the device), so the
grid depends only on the batch, the heads and the block table's width: no host
synchronisation, and the op can be captured in a CUDA graph. The new token is taken
from the op's inputs and written to the cache by the attention kernel itself (no
program reads that row back).

Prefill runs the non-absorbed form: the new tokens are written through the tables, each
sequence's cached latents are gathered through its table (padded to the batch's longest),
expanded through kv_b_proj (w_uk and w_uv) into per-head keys and values, and PyTorch's
fused attention does the rest.

The kernels take BF16/FP16 or FP32 inputs; FP32 runs the dots in IEEE precision,
which is what the CPU interpreter (TRITON_INTERPRET=1) needs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import MLAInputs, MLAWeights, PagedBatch
from dsv3.backends.latent_cache import (
    CacheSpec,
    dense_cache_dtype,
    fp8_cache_max,
    fp8_cache_views,
    fp8_latent_cache_spec,
    is_fp8_cache,
    paged_cache_spec,
    read_fp8_cache,
    write_fp8_cache,
)
from dsv3.backends.triton_kernels.configs import DecodeConfig, default_decode_config
from dsv3.backends.triton_kernels.elementwise import NO_FMA, rotate_pairs
from dsv3.backends.triton_kernels.quant import block_scale, cast_rne, fp8_constants, quantize_tile

_LOG2E = 1.4426950408889634


#: splits up to which one kernel combines the splits and projects through w_uv (one loop step per split).
FUSED_COMBINE_MAX_SPLITS = 4
#: latent columns per program of the combine kernel (more splits than FUSED_COMBINE_MAX_SPLITS).
COMBINE_COLS = 64


@triton.jit
def _decode_partial_kernel(
    q_latent_ptr, q_pe_ptr, latent_ptr, k_pe_ptr, cache_ptr, cache_scale_ptr, cache_rope_ptr, block_tables_ptr,
    seq_lens_ptr, cos_ptr, sin_ptr, partial_out_ptr, partial_lse_ptr,
    stride_qlb, stride_qlh, stride_qpb, stride_qph, stride_lb, stride_kb, stride_cache_block, stride_cache_token,
    stride_scale_block, stride_scale_token, stride_rope_block, stride_rope_token,
    stride_table, stride_rope, num_heads, num_splits, scale_log2,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROTATE: tl.constexpr, WRITE: tl.constexpr, FP8_CACHE: tl.constexpr, QTILE: tl.constexpr,
    NUM_SCALES: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, NEG_ZERO: tl.constexpr,
):
    """One (head block, split, sequence): online softmax over its share of the sequence.

    Token p of the sequence is row p % PAGE of block block_tables[seq, p // PAGE] of the cache. The new
    token (position seq_len - 1) comes from latent/k_pe rather than the cache, and the first head block of
    the split that holds it writes it to the cache: no program reads that row.
    Writes partial_out [B, H, num_splits, RANK] (normalized) and partial_lse [B, H, num_splits]
    (log2 domain) for the splits that hold at least one token. With ROTATE, q_pe and k_pe come
    unrotated and are rotated here by the sequence's cos/sin (rounded to their dtype, as the rotary
    op rounds), so the rope key goes to the cache rotated without a launch of its own. Without WRITE
    the new tokens are in the cache already (rows that share a sequence) and nothing is stored.

    With FP8_CACHE, cache_ptr is the FP8 latent view of an FP8 latent cache, cache_scale_ptr its float32
    scales (NUM_SCALES per token, one per QTILE latent values) and cache_rope_ptr its rope keys: every tile
    is dequantized in registers to q_latent's dtype before the dots, and the new token is quantized as
    fp8.quantize_activation does (bit for bit) and attends dequantized, as the cache will give it back.
    Without it the three pointers are the one dense cache.
    """
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start >= end:
        return

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_C)
    rope_cols = tl.arange(0, BLOCK_R)
    head_ok = heads < num_heads
    col_ok = cols < RANK
    rope_ok = rope_cols < ROPE

    q_latent = tl.load(q_latent_ptr + seq * stride_qlb + heads[:, None] * stride_qlh + cols[None, :],
                       mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + seq * stride_qpb + heads[:, None] * stride_qph + rope_cols[None, :],
                   mask=head_ok[:, None] & rope_ok[None, :], other=0.0)

    # The new token starts the online softmax of the split that ends the sequence: score, weight 1.
    holds_new = end == seq_len
    new_latent = tl.load(latent_ptr + seq * stride_lb + cols, mask=col_ok, other=0.0)
    if FP8_CACHE:
        new_tiles = tl.reshape(new_latent.to(tl.float32), (BLOCK_C // QTILE, QTILE))
        new_scale = block_scale(tl.max(tl.abs(new_tiles), axis=1), FP8_MAX, False)
        new_q = quantize_tile(new_tiles, new_scale, FP8_MAX, MIN_NORMAL, NEG_ZERO)  # on the FP8 grid, in fp32
        new_latent = tl.reshape(new_q * new_scale[:, None], (BLOCK_C,))
        new_q = tl.reshape(new_q, (BLOCK_C,))
    else:
        new_latent = new_latent.to(cache_ptr.dtype.element_ty)
    new_k_pe = tl.load(k_pe_ptr + seq * stride_kb + rope_cols, mask=rope_ok, other=0.0)
    if ROTATE:
        pair = tl.arange(0, BLOCK_R // 2)
        cos = tl.load(cos_ptr + seq * stride_rope + pair, mask=pair < ROPE // 2, other=0.0)[None, :]
        sin = tl.load(sin_ptr + seq * stride_rope + pair, mask=pair < ROPE // 2, other=0.0)[None, :]
        q_pe = cast_rne(rotate_pairs(q_pe, cos, sin, BLOCK_H, BLOCK_R // 2), q_pe_ptr.dtype.element_ty)
        new_k_pe = cast_rne(tl.reshape(rotate_pairs(new_k_pe[None, :], cos, sin, 1, BLOCK_R // 2), (BLOCK_R,)),
                            k_pe_ptr.dtype.element_ty)
    new_k_pe = new_k_pe.to(cache_rope_ptr.dtype.element_ty)
    new_score = (tl.sum(q_latent.to(tl.float32) * new_latent.to(tl.float32)[None, :], axis=1)
                 + tl.sum(q_pe.to(tl.float32) * new_k_pe.to(tl.float32)[None, :], axis=1)) * scale_log2
    max_score = tl.where(holds_new, new_score, float("-inf"))
    denominator = tl.where(holds_new, 1.0, 0.0) + tl.zeros([BLOCK_H], tl.float32)
    acc = tl.where(holds_new, new_latent.to(tl.float32), 0.0)[None, :] + tl.zeros([BLOCK_H, BLOCK_C], tl.float32)

    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    cache_end = tl.minimum(end, seq_len - 1)  # cached tokens of this split (the new one is not read back)
    for tile_start in range(start, cache_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_ok = tokens < cache_end
        blocks = tl.load(table + tokens // PAGE, mask=token_ok, other=0).to(tl.int64)
        rows = cache_ptr + (blocks * stride_cache_block + (tokens % PAGE) * stride_cache_token)[:, None]
        kv = tl.load(rows + cols[None, :], mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        if FP8_CACHE:
            slots = (tokens % PAGE)[:, None]
            tile_ids = tl.arange(0, BLOCK_C // QTILE)
            kv_scales = tl.load(cache_scale_ptr + blocks[:, None] * stride_scale_block + slots * stride_scale_token
                                + tile_ids[None, :], mask=token_ok[:, None] & (tile_ids < NUM_SCALES)[None, :],
                                other=0.0)
            kv = tl.reshape(tl.reshape(kv.to(tl.float32), (BLOCK_N, BLOCK_C // QTILE, QTILE)) * kv_scales[:, :, None],
                            (BLOCK_N, BLOCK_C)).to(q_latent.dtype)
            k_pe = tl.load(cache_rope_ptr + blocks[:, None] * stride_rope_block + slots * stride_rope_token
                           + rope_cols[None, :], mask=token_ok[:, None] & rope_ok[None, :], other=0.0)
        else:
            k_pe = tl.load(rows + RANK + rope_cols[None, :], mask=token_ok[:, None] & rope_ok[None, :], other=0.0)
        scores = tl.dot(q_latent, tl.trans(kv), input_precision=DOT_PRECISION)
        scores = tl.dot(q_pe, tl.trans(k_pe), acc=scores, input_precision=DOT_PRECISION)
        scores = tl.where(token_ok[None, :], scores * scale_log2, float("-inf"))
        new_max = tl.maximum(max_score, tl.max(scores, axis=1))
        rescale = tl.exp2(max_score - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        denominator = denominator * rescale + tl.sum(probs, axis=1)
        acc = tl.dot(probs.to(kv.dtype), kv, acc=acc * rescale[:, None], input_precision=DOT_PRECISION)
        max_score = new_max

    if WRITE and holds_new & (head_block == 0):  # nobody reads this row in this launch: no race
        last = seq_len - 1
        if FP8_CACHE:
            block = tl.load(table + last // PAGE).to(tl.int64)
            tl.store(cache_ptr + block * stride_cache_block + (last % PAGE) * stride_cache_token + cols,
                     new_q.to(cache_ptr.dtype.element_ty), mask=col_ok)
            tile_ids = tl.arange(0, BLOCK_C // QTILE)
            tl.store(cache_scale_ptr + block * stride_scale_block + (last % PAGE) * stride_scale_token + tile_ids,
                     new_scale, mask=tile_ids < NUM_SCALES)
            tl.store(cache_rope_ptr + block * stride_rope_block + (last % PAGE) * stride_rope_token + rope_cols,
                     new_k_pe, mask=rope_ok)
        else:
            new_row = (cache_ptr + tl.load(table + last // PAGE).to(tl.int64) * stride_cache_block
                       + (last % PAGE) * stride_cache_token)
            tl.store(new_row + cols, new_latent, mask=col_ok)
            tl.store(new_row + RANK + rope_cols, new_k_pe, mask=rope_ok)

    out_rows = (seq * num_heads + heads) * num_splits + split
    tl.store(partial_out_ptr + out_rows[:, None] * RANK + cols[None, :], acc / denominator[:, None],
             mask=head_ok[:, None] & col_ok[None, :])
    tl.store(partial_lse_ptr + out_rows, max_score + tl.log2(denominator), mask=head_ok)


@triton.jit
def _used_splits(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """How many splits hold tokens of a sequence of seq_len tokens (the partial kernel's division)."""
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    return tl.cdiv(seq_len, split_len)


@triton.jit
def _combine_kernel(
    partial_out_ptr, partial_lse_ptr, seq_lens_ptr, out_ptr,
    stride_ob, stride_oh, num_heads, num_splits,
    RANK: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_POW2: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """One (sequence, head, slice of BLOCK_COLS latent columns): the log-sum-exp weighted sum of its splits'
    partial outputs. Slicing the columns gives a batch of one sequence rank / BLOCK_COLS programs a head."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    used = _used_splits(tl.load(seq_lens_ptr + seq).to(tl.int32), num_splits, BLOCK_N)
    first = (seq * num_heads + head) * num_splits
    split_ids = tl.arange(0, SPLITS_POW2)
    lse = tl.load(partial_lse_ptr + first + split_ids, mask=split_ids < used, other=float("-inf"))
    max_lse = tl.max(lse, axis=0)
    total = tl.sum(tl.exp2(lse - max_lse), axis=0)

    cols = tl.program_id(2) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < RANK
    acc = tl.zeros([BLOCK_COLS], tl.float32)
    for chunk in range(0, used, SPLIT_CHUNK):
        ids = chunk + tl.arange(0, SPLIT_CHUNK)
        ok = ids < used
        weight = tl.exp2(tl.load(partial_lse_ptr + first + ids, mask=ok, other=float("-inf")) - max_lse)
        parts = tl.load(partial_out_ptr + (first + ids)[:, None] * RANK + cols[None, :],
                        mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * parts, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + cols, (acc / total).to(out_ptr.dtype.element_ty),
             mask=col_ok)


@triton.jit
def _combine_project_kernel(
    partial_out_ptr, partial_lse_ptr, seq_lens_ptr, w_uv_ptr, out_ptr,
    batch, num_heads, stride_wh, stride_wv, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, RANK: tl.constexpr, V_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
    V_CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (head, block of sequences): combine the splits, then out = latent @ w_uv[head]^T.

    For few splits (the loop over them is unrolled, so their loads are in flight together).
    """
    num_splits = NUM_SPLITS
    head = tl.program_id(0)
    seqs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    seq_ok = seqs < batch
    used = _used_splits(tl.load(seq_lens_ptr + seqs, mask=seq_ok, other=1).to(tl.int32), num_splits, BLOCK_N)
    first = (seqs * num_heads + head) * num_splits
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < RANK

    max_lse = tl.full([BLOCK_B], -1e30, tl.float32)
    total = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        ok = seq_ok & (split < used)
        lse = tl.load(partial_lse_ptr + first + split, mask=ok, other=-1e30)
        part = tl.load(partial_out_ptr + (first + split)[:, None] * RANK + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0)
        new_max = tl.maximum(max_lse, lse)
        rescale = tl.exp2(max_lse - new_max)
        weight = tl.where(ok, tl.exp2(lse - new_max), 0.0)
        acc = acc * rescale[:, None] + weight[:, None] * part
        total = total * rescale + weight
        max_lse = new_max
    latent = (acc / tl.where(seq_ok, total, 1.0)[:, None]).to(w_uv_ptr.dtype.element_ty)

    for value_start in tl.static_range(0, V_DIM, V_CHUNK):
        values = value_start + tl.arange(0, V_CHUNK)
        value_ok = values < V_DIM
        w_uv_t = tl.load(w_uv_ptr + head * stride_wh + values[None, :] * stride_wv + cols[:, None],
                         mask=col_ok[:, None] & value_ok[None, :], other=0.0)  # [BLOCK_C, V_CHUNK]
        out = tl.dot(latent, w_uv_t, input_precision=DOT_PRECISION)
        tl.store(out_ptr + seqs[:, None] * stride_ob + head * stride_oh + values[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=seq_ok[:, None] & value_ok[None, :])


def mla_cache_spec(num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto", fp8_dtype: torch.dtype | None = None) -> CacheSpec:
    """[num_blocks, block_size, kv_lora_rank + rope_dim]: latent then rope key, one row per token; with
    kv_cache_dtype "fp8" the FP8 latent cache in `fp8_dtype` (latent_cache.fp8_latent_cache_spec), where the
    chip has one (else the dense cache in `dtype`, its layout saying so)."""
    if kv_cache_dtype == "fp8" and fp8_dtype is not None:
        return fp8_latent_cache_spec(num_blocks, block_size, kv_lora_rank, rope_dim, dtype, fp8_dtype)
    spec = paged_cache_spec(num_blocks, block_size, kv_lora_rank, rope_dim, dense_cache_dtype(kv_cache_dtype, dtype))
    if kv_cache_dtype == "fp8":
        return replace(spec, layout=f"{spec.layout} (no FP8 on this chip: the latent cache stays {dtype})")
    return spec


def allocate_mla_cache(spec: CacheSpec, device: torch.device | str) -> torch.Tensor:
    """A zeroed cache as described by `spec`."""
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)


def prepare_mla(kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int,
                dtype: torch.dtype) -> MLAWeights:
    """Split kv_b_proj [H * (nope + v), C] into w_uk [H, nope, C] and w_uv [H, v, C], kept in `dtype`.

    The dense weight in `dtype` stays in extra for the prefill's expansion of the latents.
    """
    dense = kv_b_weight.to(dtype).contiguous()
    per_head = dense.view(num_heads, qk_nope_head_dim + v_head_dim, -1)
    return MLAWeights(w_uk=per_head[:, :qk_nope_head_dim].contiguous(),
                      w_uv=per_head[:, qk_nope_head_dim:].contiguous(),
                      extra={_dtype_key("kv_b", dtype): dense})


def _dtype_key(name: str, dtype: torch.dtype) -> str:
    return f"{name}_{str(dtype).removeprefix('torch.')}"


def _weight(weights: MLAWeights, name: str, dtype: torch.dtype) -> torch.Tensor:
    """weights.<name> in `dtype`, converted once and kept in weights.extra."""
    tensor = getattr(weights, name)
    if tensor.dtype == dtype:
        return tensor
    key = _dtype_key(name, dtype)
    if key not in weights.extra:
        weights.extra[key] = tensor.to(dtype).contiguous()
    return weights.extra[key]


def _kv_b(weights: MLAWeights, dtype: torch.dtype) -> torch.Tensor:
    """kv_b_proj [H * (nope + v), C] in `dtype`, rebuilt once from w_uk and w_uv."""
    key = _dtype_key("kv_b", dtype)
    if key not in weights.extra:
        rank = weights.w_uk.shape[-1]
        weights.extra[key] = torch.cat((weights.w_uk, weights.w_uv), dim=1).reshape(-1, rank).to(dtype).contiguous()
    return weights.extra[key]


def _check_cache(cache: torch.Tensor, rank: int, rope: int, rope_dtype: torch.dtype | None = None) -> None:
    if is_fp8_cache(cache):
        fp8_cache_views(cache, rank, rope, rope_dtype)  # raises for a pool of another shape
        return
    if cache.dim() != 3 or cache.shape[-1] != rank + rope or cache.stride(-1) != 1 or cache.stride(1) != rank + rope:
        raise BackendError(f"MLA cache: expected a [num_blocks, block_size, {rank + rope}] tensor with contiguous "
                           f"rows, found shape {tuple(cache.shape)} strides {cache.stride()}")


_SM_COUNTS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def choose_num_splits(batch: int, heads: int, max_seq_len: int, config: DecodeConfig, num_sms: int) -> int:
    """Splits per sequence: about config.programs_per_sm programs per SM at full length, each split at
    least config.min_split_tokens long."""
    programs = batch * triton.cdiv(heads, config.block_h)
    wanted = max(1, config.programs_per_sm * num_sms // programs)
    return max(1, min(wanted, triton.cdiv(max_seq_len, max(config.min_split_tokens, config.block_n))))


def _attend_splits(q_latent, q_pe, latent, k_pe, cache, batch: PagedBatch, softmax_scale, config, num_splits,
                   rope=None, write=True):
    """Launch the partial kernel; returns (partial_out [B, H, splits, C] fp32, partial_lse [B, H, splits]).
    rope: None (q_pe and k_pe rotated already) or (cos, sin) [B, R/2] to rotate them in the kernel.
    write: the kernel stores the new tokens (False: they are in the cache already)."""
    num_seqs, heads, rank = q_latent.shape
    rope_dim = q_pe.shape[-1]
    _check_cache(cache, rank, rope_dim, k_pe.dtype)
    q_latent, q_pe = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_latent, q_pe))
    latent, k_pe = (t if t.stride(-1) == 1 else t.contiguous() for t in (latent, k_pe))
    tables = batch.block_tables if batch.block_tables.stride(-1) == 1 else batch.block_tables.contiguous()
    partial_out = torch.empty(num_seqs, heads, num_splits, rank, dtype=torch.float32, device=cache.device)
    partial_lse = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=cache.device)
    if rope is None:
        cos = sin = batch.seq_lens  # not read
    else:
        cos, sin = (t.reshape(num_seqs, rope_dim // 2).float().contiguous() for t in rope)
    block_c = triton.next_power_of_2(rank)
    if is_fp8_cache(cache):  # the typed views of the pool and how its latents are quantized
        latent_view, scale_view, rope_view = fp8_cache_views(cache, rank, rope_dim, k_pe.dtype)
        fp8_args = dict(FP8_CACHE=True, QTILE=min(fp8.BLOCK, block_c), NUM_SCALES=fp8.num_blocks(rank),
                        FP8_MAX=fp8_cache_max(cache), **fp8_constants(cache.dtype))
    else:
        latent_view = scale_view = rope_view = cache
        fp8_args = dict(FP8_CACHE=False, QTILE=1, NUM_SCALES=0, FP8_MAX=0.0, MIN_NORMAL=0.0, NEG_ZERO=False)
    _decode_partial_kernel[(triton.cdiv(heads, config.block_h), num_splits, num_seqs)](
        q_latent, q_pe, latent, k_pe, latent_view, scale_view, rope_view, tables, batch.seq_lens, cos, sin,
        partial_out, partial_lse,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), k_pe.stride(0),
        latent_view.stride(0), latent_view.stride(1), scale_view.stride(0), scale_view.stride(1),
        rope_view.stride(0), rope_view.stride(1), tables.stride(0), cos.stride(0), heads, num_splits,
        softmax_scale * _LOG2E, RANK=rank, ROPE=rope_dim, BLOCK_C=block_c,
        BLOCK_R=triton.next_power_of_2(rope_dim), BLOCK_H=config.block_h, BLOCK_N=config.block_n,
        PAGE=cache.shape[1], DOT_PRECISION=_dot_precision(q_latent.dtype), ROTATE=rope is not None, WRITE=write,
        **fp8_args, num_warps=config.num_warps, num_stages=config.num_stages, **(NO_FMA if rope is not None else {}),
        **config.launch)
    return partial_out, partial_lse


def _dot_precision(dtype: torch.dtype) -> str | None:
    """IEEE dots for fp32 inputs; for 16-bit inputs the target's default (tf32 is not valid on gfx950)."""
    return "ieee" if dtype == torch.float32 else None


def _combine(partial_out, partial_lse, seq_lens, out, block_n):
    """Combine the splits into out [B, H, C] (any strides with a contiguous last dim)."""
    num_seqs, heads, num_splits, rank = partial_out.shape
    block_cols = min(COMBINE_COLS, triton.next_power_of_2(rank))
    _combine_kernel[(num_seqs, heads, triton.cdiv(rank, block_cols))](
        partial_out, partial_lse, seq_lens, out, out.stride(0), out.stride(1), heads, num_splits,
        RANK=rank, BLOCK_COLS=block_cols, BLOCK_N=block_n, SPLITS_POW2=triton.next_power_of_2(num_splits),
        SPLIT_CHUNK=min(32, triton.next_power_of_2(num_splits)), num_warps=4)


def mla_decode(inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch, weights: MLAWeights,
               softmax_scale: float, config: DecodeConfig | None = None, num_splits: int | None = None,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One new token per row: write it through the block table, attend over [0, seq_lens[b]) (absorbed).

    Three launches: the latent query (a batched GEMM over heads), the split attention kernel, and a
    combine kernel that also applies w_uv (up to FUSED_COMBINE_MAX_SPLITS splits; beyond, the combine
    writes latents and a batched GEMM applies w_uv). The number of splits comes from the batch size
    and the block table's width (the longest sequence it can address), never from seq_lens.

    Args:
        inputs: q_nope [B, H, nope], q_pe [B, H, R], latent [B, C], k_pe [B, R]; q_pe and k_pe rotated,
            or not yet with `rope`.
        cache: [num_blocks, block_size, C + R], or an FP8 latent cache (its rope keys in k_pe's dtype);
            batch: block_tables [B, W] and seq_lens [B] int32; with
            batch.shared_rows the tokens are written first (one more launch) and `rope` must be None.
        weights: w_uk [H, nope, C] and w_uv [H, v, C] (any float dtype; converted once to the cache's).
        config, num_splits: override the kernel's tile sizes and sequence splits.
        rope: (cos, sin) [B, R/2] float32 of the new positions: the attention kernel rotates q_pe and k_pe
            (the same rounding as the rotary op where q_pe's dtype is the cache's, as in the model).
    Returns:
        [B, H, v] in q_nope's dtype.
    """
    dtype = compute_dtype(cache, inputs)
    q_nope = inputs.q_nope
    w_uk, w_uv = _weight(weights, "w_uk", dtype), _weight(weights, "w_uv", dtype)
    num_seqs, heads = q_nope.shape[:2]
    rank, v_dim = w_uk.shape[-1], w_uv.shape[1]
    config = config or default_decode_config(heads, dtype)
    if num_splits is None:
        addressable = batch.block_tables.shape[1] * cache.shape[1]
        num_splits = choose_num_splits(num_seqs, heads, addressable, config, _num_sms(cache.device))
    if batch.shared_rows:  # a row may read the tokens of the rows before it: all go in first
        if rope is not None:
            raise BackendError("MLA decode: rows that share sequences take q_pe and k_pe rotated (rope=None)")
        write_tokens(inputs, cache, batch)
    q_latent = torch.bmm(q_nope.to(dtype).transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, C]
    partial_out, partial_lse = _attend_splits(q_latent, inputs.q_pe.to(dtype), inputs.latent, inputs.k_pe, cache,
                                              batch, softmax_scale, config, num_splits, rope,
                                              write=not batch.shared_rows)
    if num_splits <= FUSED_COMBINE_MAX_SPLITS:
        out = torch.empty(num_seqs, heads, v_dim, dtype=q_nope.dtype, device=cache.device)
        block_b = 16
        _combine_project_kernel[(heads, triton.cdiv(num_seqs, block_b))](
            partial_out, partial_lse, batch.seq_lens, w_uv, out, num_seqs, heads,
            w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
            RANK=rank, V_DIM=v_dim, BLOCK_C=triton.next_power_of_2(rank),
            V_CHUNK=min(32, triton.next_power_of_2(v_dim)), BLOCK_B=block_b, BLOCK_N=config.block_n,
            DOT_PRECISION=_dot_precision(dtype), num_warps=8)
        return out
    latent_out = torch.empty(heads, num_seqs, rank, dtype=dtype, device=cache.device)
    _combine(partial_out, partial_lse, batch.seq_lens, latent_out.transpose(0, 1), config.block_n)
    out = torch.bmm(latent_out, w_uv.transpose(1, 2))  # [H, B, v]
    return out.transpose(0, 1).to(q_nope.dtype).contiguous()


def compute_dtype(cache: torch.Tensor, inputs: MLAInputs) -> torch.dtype:
    """The dtype decode's dots run in: a dense cache's own, or for an FP8 latent cache the rope key's
    (the activation dtype), which its tiles are dequantized to."""
    return inputs.k_pe.dtype if is_fp8_cache(cache) else cache.dtype


def write_tokens(inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch) -> None:
    """Store each new token's latent and rope key at its position, through the block tables (no sync);
    an FP8 latent cache gets the latent quantized per 128 values (latent_cache.write_fp8_cache)."""
    seq, position = batch.token_positions(inputs.latent.shape[0])
    rows = batch.cache_rows(seq, position, cache.shape[1])
    if is_fp8_cache(cache):
        write_fp8_cache(cache, rows, inputs.latent, inputs.k_pe)
        return
    cache.view(-1, cache.shape[-1])[rows] = torch.cat((inputs.latent, inputs.k_pe), dim=-1).to(cache.dtype)


def gather_sequences(cache: torch.Tensor, batch: PagedBatch, length: int,
                     fp8_layout: tuple[int, int, torch.dtype] | None = None) -> torch.Tensor:
    """[B, length, C + R]: the first `length` positions of every sequence, read through its block table;
    rows at or past a sequence's seq_len are zero (a pool block may hold anything there). An FP8 latent
    cache, whose fp8_layout = (C, R, rope dtype) must be given, comes back dequantized in float32."""
    num_seqs = batch.num_seqs
    positions = torch.arange(length, device=cache.device).expand(num_seqs, length)
    seqs = torch.arange(num_seqs, device=cache.device)[:, None].expand(num_seqs, length)
    if is_fp8_cache(cache):
        rows = read_fp8_cache(cache, batch.cache_rows(seqs, positions, cache.shape[1]), *fp8_layout)
    else:
        rows = cache.view(-1, cache.shape[-1])[batch.cache_rows(seqs, positions, cache.shape[1])]
    return rows.masked_fill((positions >= batch.seq_lens.long()[:, None])[..., None], 0)


def mla_prefill(inputs: MLAInputs, cache: torch.Tensor, batch: PagedBatch, weights: MLAWeights,
                softmax_scale: float) -> torch.Tensor:
    """Write the new tokens through the block tables and attend causally (non-absorbed form).

    Each sequence's queries are padded to batch.max_query_len and its keys to batch.max_seq_len, so the
    work grows with B x max_seq_len: a step's decodes belong in mla_decode. When every sequence is a
    whole prompt of the same length (N = B x max_seq_len), SDPA runs plainly causal; otherwise with a
    mask for queries that start mid-sequence (chunked prefill, a cached prefix).

    Args:
        inputs: q_nope [N, H, nope], q_pe [N, H, R] rotated, latent [N, C], k_pe [N, R] rotated.
        cache: [num_blocks, block_size, C + R], or an FP8 latent cache (its rope keys in k_pe's dtype);
            batch: block tables, seq_lens, query_start and bounds.
        weights: w_uk [H, nope, C] and w_uv [H, v, C].
    Returns:
        [N, H, v] in q_nope's dtype.
    """
    num_tokens, heads, nope = inputs.q_nope.shape
    rank, rope = inputs.latent.shape[-1], inputs.k_pe.shape[-1]
    _check_cache(cache, rank, rope, inputs.k_pe.dtype)
    num_seqs, max_query, max_seq = batch.num_seqs, batch.max_query_len, batch.max_seq_len
    if max_seq > batch.block_tables.shape[1] * cache.shape[1]:
        raise BackendError(f"MLA prefill: max_seq_len {max_seq} is beyond what block_tables of width "
                           f"{batch.block_tables.shape[1]} address with blocks of {cache.shape[1]} tokens")
    write_tokens(inputs, cache, batch)
    dtype, device = inputs.q_nope.dtype, cache.device
    cached = gather_sequences(cache, batch, max_seq, (rank, rope, inputs.k_pe.dtype))  # [B, S, C + R]
    per_head = F.linear(cached[..., :rank].to(dtype), _kv_b(weights, dtype)).view(num_seqs, max_seq, heads, -1)
    keys = torch.empty(num_seqs, max_seq, heads, nope + rope, dtype=dtype, device=device)
    keys[..., :nope] = per_head[..., :nope]
    keys[..., nope:] = cached[:, :, None, rank:].to(dtype)
    values = per_head[..., nope:]

    # every q_len = seq_len = max_seq_len: the sum of the q_len is N and none is above its seq_len
    whole_prompts = num_tokens == num_seqs * max_seq and max_query == max_seq
    queries = torch.zeros(num_seqs, max_query, heads, nope + rope, dtype=dtype, device=device)
    if whole_prompts:
        seq = slot = None
        queries.view(num_tokens, heads, -1)[..., :nope] = inputs.q_nope
        queries.view(num_tokens, heads, -1)[..., nope:] = inputs.q_pe
        mask, causal = None, True
    else:
        seq, position = batch.token_positions(num_tokens)
        slot = torch.arange(num_tokens, device=device) - batch.query_start.long()[seq]  # row in its sequence
        queries[seq, slot, :, :nope] = inputs.q_nope
        queries[seq, slot, :, nope:] = inputs.q_pe
        query_pos = torch.zeros(num_seqs, max_query, dtype=torch.long, device=device)  # padding rows see key 0
        query_pos[seq, slot] = position
        mask = (torch.arange(max_seq, device=device) <= query_pos[..., None])[:, None]  # [B, 1, Tq, S]
        causal = False
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal, scale=softmax_scale).transpose(1, 2)
    if whole_prompts:
        return out.reshape(num_tokens, heads, -1).contiguous()
    return out[seq, slot].contiguous()
