"""The Ascend backend: Huawei 910B/910C in BF16 (and Ascend 950 with FP8) through torch_npu.

910B and 910C have no FP8, so an FP8 checkpoint is dequantized to BF16 while it
loads (the precision policy picks bf16 because `native_fp8` is False there).
The heavy ops run on the fused torch_npu ops vllm-ascend runs DeepSeek on:

    rms_norm     npu_rms_norm, npu_add_rms_norm with a residual
    rope         npu_rotary_mul(rotary_mode="interleave")
    attention    npu_fused_infer_attention_score, MLA form (query_rope/key_rope) reading the paged latent
                 cache through the engine's block tables
    moe_gating   npu_moe_gating_top_k (only where its A2/A3 limits hold)
    moe_experts  npu_moe_init_routing_v2, npu_grouped_matmul, npu_swiglu, npu_grouped_matmul, then a gather

Each fused op has a plain-PyTorch path beside it. A path whose documented limits
do not hold for the model falls back to plain by itself; a user bisecting a
wrong result on real hardware can force any of them plain with the constructor
(`use_fused`) or DSV3_ASCEND_PLAIN="rope,moe_gating" (or "all").

Every documented behaviour a call relies on is noted at the call. "the 2.14 docs"
is torch_npu/_op_plugin_docs.py in the torch-npu 2.14.0 wheel; "the 7.0.0 docs" is
the torch_npu API reference for Ascend Extension for PyTorch 7.0.0 on hiascend.com.
Nothing here has been run on an Ascend chip: the tests run it on a CPU emulation of
these ops (tests/npu_emulation), written from the same documents.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError, BackendUnavailable
from dsv3.backends.interface import (
    Backend,
    Capabilities,
    ExpertWeights,
    LinearWeight,
    MLAInputs,
    MLAWeights,
    NormOutput,
    OpImpl,
    PagedBatch,
    Precision,
    RoutingConfig,
    plain,
)
from dsv3.backends.latent_cache import CacheSpec, dense_cache_dtype
from dsv3.backends.platforms import HUAWEI, ChipInfo, ascend_chip
from dsv3.backends.reference import ReferenceBackend, paged_attention, route_experts

#: The fused paths a user can switch to plain, by name.
FUSED_PATHS: tuple[str, ...] = ("rms_norm", "rope", "attention", "moe_gating", "moe_experts")
PLAIN_ENV = "DSV3_ASCEND_PLAIN"

#: Block sizes the MLA form of npu_fused_infer_attention_score takes: 16 or 128 without sparse_mode 4 (decode),
#: 64 or 128 with it (prefill) (the 2.14 docs, "query_rope和key_rope参数约束"); other sizes run plain. 128, which
#: both take, is the platform's mla_block_size (backends/platforms/huawei.py): the engine's default here.
DECODE_BLOCK_SIZES, PREFILL_BLOCK_SIZES = (16, 128), (64, 128)
#: The MLA form needs the latent (D) 512 and the rope part 64 wide, as in DeepSeek-V2/V3.
MLA_LATENT_DIM, MLA_ROPE_DIM = 512, 64
#: Query heads the MLA form takes: 32, 64 or 128 without sparse_mode 4, exactly 128 with it.
MLA_DECODE_HEADS, MLA_PREFILL_HEADS = (32, 64, 128), 128
#: sparse_mode 4 keeps the key sequence at most this long.
MLA_PREFILL_MAX_KV = 131088
#: The compressed causal mask sparse_modes 2-4 take: 2048 x 2048, True (masked) above the diagonal.
MASK_SIZE = 2048
INT32_MAX = 2**31 - 1
#: npu_rms_norm takes 2-8-D input (2.14 docs).
NORM_DIMS = (2, 8)
#: npu_rotary_mul's interleave mode: the rope dim even and below this, B * N heads below ROPE_MAX_HEADS (2.14 docs).
ROPE_MAX_DIM, ROPE_MAX_HEADS = 896, 1000
#: npu_moe_gating_top_k as vllm-ascend runs it: DeepSeek-V3's 256 experts in 8 groups, 4 of them kept.
GATING_EXPERTS, GATING_GROUPS, GATING_TOPK_GROUPS = 256, 8, 4
#: npu_moe_init_routing_v2's expert count limit.
MOE_MAX_EXPERTS = 1024

_FIA = ("torch_npu.npu_fused_infer_attention_score, MLA form ({}) through the block tables")
_FIA_WHEN = (f"kv_lora_rank is {MLA_LATENT_DIM}, the rope dim {MLA_ROPE_DIM}, bf16/fp16, heads <= {{}} (padded) "
             "and the block size {}")
#: op -> (the fused path that switches it, what runs on the NPU, written from the limits above that the
#: dispatch checks); elsewhere an op runs the reference backend's code (`_plain`), and Capabilities.ops says so.
NPU_OPS: dict[str, tuple[str, OpImpl]] = {
    "rms_norm": ("rms_norm", OpImpl("torch_npu.npu_rms_norm / npu_add_rms_norm",
                                    when=f"x is {NORM_DIMS[0]}-{NORM_DIMS[1]}-D")),
    "rotary": ("rope", OpImpl("torch_npu.npu_rotary_mul interleave, fp32",
                              when=f"x is 3-D or more, the rope dim even and < {ROPE_MAX_DIM}, heads < "
                                   f"{ROPE_MAX_HEADS}")),
    "mla_prefill": ("attention", OpImpl(_FIA.format("sparse_mode 4, BSND right-padded"),
                                        when=_FIA_WHEN.format(MLA_PREFILL_HEADS, " or ".join(
                                            map(str, PREFILL_BLOCK_SIZES))))),
    "mla_decode": ("attention", OpImpl(_FIA.format("sparse_mode 0, BSND"),
                                       when=_FIA_WHEN.format(max(MLA_DECODE_HEADS), " or ".join(
                                           map(str, DECODE_BLOCK_SIZES))))),
    "moe_route": ("moe_gating", OpImpl("torch_npu.npu_moe_gating_top_k",
                                       when=f"sigmoid noaux_tc with {GATING_EXPERTS} experts in {GATING_GROUPS} "
                                            f"groups, topk_group {GATING_TOPK_GROUPS}, normalized, 1 < k <= 32")),
    "moe_experts": ("moe_experts", OpImpl("torch_npu.npu_moe_init_routing_v2 + npu_grouped_matmul + npu_swiglu + "
                                          "npu_grouped_matmul + torch gather",
                                          when=f"dense experts, at most {MOE_MAX_EXPERTS}")),
}


def fused_settings(use_fused: bool | Mapping[str, bool] = True,
                   environ: Mapping[str, str] = os.environ) -> dict[str, bool]:
    """Which paths run fused: the constructor setting, then DSV3_ASCEND_PLAIN forces the listed paths plain.

    Args:
        use_fused: True (all fused), False (all plain), or {path: bool} over the defaults (all fused).
        environ: where DSV3_ASCEND_PLAIN is read ("rope,moe_gating", "all" or empty).
    Returns:
        {path: True if fused} for every name in FUSED_PATHS.
    """
    if isinstance(use_fused, bool):
        settings = dict.fromkeys(FUSED_PATHS, use_fused)
    elif isinstance(use_fused, Mapping):
        unknown = sorted(set(use_fused) - set(FUSED_PATHS))
        if unknown:
            raise BackendError(f"AscendBackend use_fused: unknown path {unknown[0]!r}; "
                            f"expected any of {', '.join(FUSED_PATHS)}")
        settings = {name: bool(use_fused.get(name, True)) for name in FUSED_PATHS}
    else:
        raise BackendError(f"AscendBackend use_fused must be true, false or a mapping of paths, found {use_fused!r}")
    plain = [name.strip() for name in environ.get(PLAIN_ENV, "").split(",") if name.strip()]
    for name in plain:
        if name == "all":
            settings = dict.fromkeys(FUSED_PATHS, False)
        elif name in settings:
            settings[name] = False
        else:
            raise BackendError(f"{PLAIN_ENV}={environ[PLAIN_ENV]!r}: unknown path {name!r}; "
                            f"expected 'all' or any of {', '.join(FUSED_PATHS)}")
    return settings


class AscendBackend(Backend):
    """Huawei Ascend NPUs through torch_npu (imported when the backend is built).

    Args:
        device: "npu" or "npu:N" (default "npu:0"); "cpu" only with the test emulation of torch_npu.
        chip: the chip, or None to ask torch_npu (e.g. describe_chip("huawei", "ascend910b")).
        use_fused: True, False, or {path: bool} for the paths in FUSED_PATHS; DSV3_ASCEND_PLAIN
            forces paths plain on top of it.
    """

    platform = HUAWEI

    def __init__(self, device: str | None = None, chip: ChipInfo | None = None,
                 use_fused: bool | Mapping[str, bool] = True):
        try:
            import torch_npu  # noqa: PLC0415 (vendor import only when this backend is chosen)
        except (ImportError, OSError) as e:  # without CANN's libraries torch_npu fails to import
            raise BackendUnavailable(f"backend ascend needs torch_npu and Huawei CANN (pip install -e '.[ascend]', "
                            f"then source CANN's set_env.sh): {e}") from e
        self.npu = torch_npu
        device = "npu:0" if device in (None, "npu") else device
        self._device = torch.device(device)
        self.chip = chip if chip is not None else ascend_chip(torch_npu.npu, torch_npu, self._device.index or 0)
        if self.chip.vendor != "huawei":
            raise BackendError(f"AscendBackend: chip {self.chip.arch!r} ({self.chip.vendor}) is not a Huawei "
                               "Ascend chip")
        self.fused = fused_settings(use_fused)
        #: set by tests/npu_emulation: the ops are a CPU emulation, not an NPU
        self.emulation: str | None = getattr(torch_npu, "DSV3_EMULATION", None)
        fp8_format = self.chip.fp8_format
        self._plain = ReferenceBackend(self._device, fp8_format or "e4m3fn", self.chip.fp8_max)
        self._mask: torch.Tensor | None = None
        self.capabilities = Capabilities(
            name="ascend",
            device=str(self._device),
            fp8_dtype=fp8.FP8_FORMATS[fp8_format] if fp8_format else None,
            fp8_max=self.chip.fp8_max,
            dist_backend=HUAWEI.dist_backend,
            native_fp8=self.chip.has_fp8,
            ops=self._describe_ops(),
        )

    @property
    def ue8m0(self) -> bool:
        """Power-of-two activation scales: the FP8 math runs in the reference backend's code, so it holds them."""
        return self._plain.ue8m0

    @ue8m0.setter
    def ue8m0(self, enabled: bool) -> None:
        self._plain.ue8m0 = enabled

    def _describe_ops(self) -> dict[str, str | OpImpl]:
        """What each op runs: NPU_OPS where its fused path is on, else the reference backend's code."""
        ops: dict[str, str | OpImpl] = {op: f"{impl} (plain)" for op, impl in self._plain.capabilities.ops.items()}
        ops["linear_fp8"] = ("torch: block-scaled FP8 emulated in fp32 (no torch_npu block-FP8 GEMM wired)"
                             if self.chip.has_fp8 else f"none: {self.chip.arch} has no FP8 (BF16 dequantized at load)")
        notes = (self.emulation,) if self.emulation else ()
        for op, (path, impl) in NPU_OPS.items():
            if self.fused[path]:
                ops[op] = replace(impl, otherwise=ops[op], notes=notes)
        return ops

    # ---- weight preparation (once, at load) --------------------------------

    def _prepare(self, weight: torch.Tensor, scale: torch.Tensor | None, precision: Precision):
        """(weight on the device, scale or None); FP8 is dequantized on the host, before the copy."""
        if precision == "fp8":
            if not self.chip.has_fp8:
                raise BackendError(f"precision fp8: {self.chip.arch} has no FP8; use bf16 (auto picks it)")
            if scale is None:
                return fp8.quantize_blocks(weight.to(self.device), self.capabilities.fp8_dtype)
            return weight.to(self.device), scale.to(self.device, torch.float32)
        return self.dense_weight(weight, scale, precision).to(self.device), None

    def prepare_linear(self, weight, scale_inv, precision: Precision) -> LinearWeight:
        w, s = self._prepare(weight, scale_inv, precision)
        return LinearWeight(w, s, weight.shape[0], weight.shape[1])

    def prepare_experts(self, gate_up, gate_up_scale, down, down_scale, precision: Precision) -> ExpertWeights:
        if precision == "fp8":
            (gu, gus), (d, ds) = self._prepare(gate_up, gate_up_scale, "fp8"), self._prepare(down, down_scale, "fp8")
            return ExpertWeights(gu, gus, d, ds)
        # npu_grouped_matmul multiplies x [M, K] by weight [E, K, N] (2.14 docs, group_type 0, "单单单"), so the
        # experts are kept as [E, in, out] and ExpertWeights holds transposed views of them (no second copy).
        kn = []
        for w, s in ((gate_up, gate_up_scale), (down, down_scale)):
            kn.append(self.dense_weight(w, s, precision).transpose(1, 2).contiguous().to(self.device))
        gate_up_kn, down_kn = kn
        return ExpertWeights(gate_up_kn.transpose(1, 2), None, down_kn.transpose(1, 2), None,
                             extra={"gate_up_kn": gate_up_kn, "down_kn": down_kn})

    def prepare_mla(self, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, dtype) -> MLAWeights:
        w = kv_b_weight.to(self.device, torch.float32).view(num_heads, qk_nope_head_dim + v_head_dim, -1)
        return MLAWeights(w_uk=w[:, :qk_nope_head_dim].to(dtype).contiguous(),
                          w_uv=w[:, qk_nope_head_dim:].to(dtype).contiguous())

    # ---- GEMM --------------------------------------------------------------

    def linear(self, x, weight: LinearWeight):
        return self._plain.linear(x, weight)

    # ---- small ops ---------------------------------------------------------

    def rms_norm(self, x, weight, eps, residual=None, quantize=False):
        if not self.fused["rms_norm"] or not NORM_DIMS[0] <= x.dim() <= NORM_DIMS[1]:
            return self._plain.rms_norm(x, weight, eps, residual)
        gamma = weight.to(x.dtype)  # gamma must have self's dtype; self is 2-8-D (2.14 docs, npu_rms_norm)
        if residual is None:
            return NormOutput(self.npu.npu_rms_norm(x, gamma, epsilon=eps)[0], x)  # -> (y, rstd)
        # npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2) (not in the 2.14 docs file; the
        # op-plugin test test_npu_add_rms_norm.py and the hiascend API page give this signature)
        y, _, summed = self.npu.npu_add_rms_norm(x, residual, gamma, eps)
        return NormOutput(y, summed)

    def rotary(self, x, cos, sin):
        rope_dim = x.shape[-1]
        heads = math.prod(x.shape[2:-1])
        # interleave mode: input 4-D BSND with r1/r2 1S1D, D even and < 896, B * N < 1000 (2.14 docs)
        if (not self.fused["rope"] or x.dim() < 3 or rope_dim % 2 or rope_dim >= ROPE_MAX_DIM
                or heads >= ROPE_MAX_HEADS):
            return self._plain.rotary(x, cos, sin)
        tokens = x.shape[0] * x.shape[1]
        # B = 1 and every token on the S axis, so the per-position tables fit the 1S1D form; fp32 input
        # (supported) keeps the reference's precision. output = r1 * x + r2 * x_new with
        # x_new[2i] = -x[2i+1], x_new[2i+1] = x[2i], so r1/r2 repeat cos/sin over each pair.
        x4 = x.float().reshape(1, tokens, heads, rope_dim).contiguous()
        r1 = cos.float().reshape(1, tokens, 1, -1).repeat_interleave(2, dim=-1).contiguous()
        r2 = sin.float().reshape(1, tokens, 1, -1).repeat_interleave(2, dim=-1).contiguous()
        out = self.npu.npu_rotary_mul(x4, r1, r2, rotary_mode="interleave")
        return out.view(x.shape).to(x.dtype)

    # ---- MLA: a paged latent cache -----------------------------------------

    def mla_cache_spec(self, num_blocks, block_size, kv_lora_rank, rope_dim, dtype,
                       kv_cache_dtype="auto") -> CacheSpec:
        """The split paged cache below; kv_cache_dtype "fp8" keeps it in `dtype` (910B/910C have no FP8, and
        the fused attention op reads 16-bit pages), which the layout says."""
        if num_blocks < 1 or block_size < 1:
            raise BackendError(f"MLA cache: num_blocks and block_size must be at least 1, "
                               f"got {num_blocks} and {block_size}")
        dtype = dense_cache_dtype(kv_cache_dtype, dtype)
        width = kv_lora_rank + rope_dim
        no_fp8 = " (no FP8 latent cache on Ascend: it stays in the activation dtype)" if kv_cache_dtype == "fp8" else ""
        return CacheSpec(
            shape=(num_blocks, block_size * width), dtype=dtype,
            layout=(f"one buffer (a row is not a block): latent pages [{num_blocks}, {block_size}, {kv_lora_rank}] "
                    f"then rope pages [{num_blocks}, {block_size}, {rope_dim}], each contiguous; token p of a "
                    f"sequence is row p % {block_size} of page block_tables[b, p // {block_size}] in both{no_fp8}"),
            bytes_per_token=width * torch.empty((), dtype=dtype).element_size(),
            num_blocks=num_blocks, block_size=block_size)

    def allocate_mla_cache(self, spec: CacheSpec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=self.device)

    @staticmethod
    def _pages(cache: torch.Tensor, rank: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(latent pages [P, block_size, rank], rope pages [P, block_size, R], block_size): contiguous views."""
        if cache.dim() != 2 or cache.shape[1] % (rank + rope_dim) or not cache.is_contiguous():
            raise BackendError(f"MLA cache: expected a contiguous [num_blocks, block_size * {rank + rope_dim}] "
                               f"buffer (mla_cache_spec), found shape {tuple(cache.shape)}")
        num_blocks, block_size = cache.shape[0], cache.shape[1] // (rank + rope_dim)
        flat = cache.view(-1)
        split = num_blocks * block_size * rank
        return (flat[:split].view(num_blocks, block_size, rank), flat[split:].view(num_blocks, block_size, rope_dim),
                block_size)

    def _write(self, latent_pages, rope_pages, block_size, inputs: MLAInputs, batch: PagedBatch) -> None:
        """Store each new token's latent and rope key through the block tables (index_put on the device)."""
        seq, position = batch.token_positions(inputs.latent.shape[0])
        rows = batch.cache_rows(seq, position, block_size)
        latent_pages.view(-1, latent_pages.shape[-1])[rows] = inputs.latent.to(latent_pages.dtype)
        rope_pages.view(-1, rope_pages.shape[-1])[rows] = inputs.k_pe.to(rope_pages.dtype)

    def _fia_heads(self, num_heads: int, rank: int, rope_dim: int, dtype: torch.dtype, block_size: int,
                   prefill: bool) -> int | None:
        """Heads to pad the query to for the MLA form of npu_fused_infer_attention_score, or None to run plain."""
        if (not self.fused["attention"] or rank != MLA_LATENT_DIM or rope_dim != MLA_ROPE_DIM
                or dtype not in (torch.bfloat16, torch.float16)
                or block_size not in (PREFILL_BLOCK_SIZES if prefill else DECODE_BLOCK_SIZES)):
            return None
        choices = (MLA_PREFILL_HEADS,) if prefill else MLA_DECODE_HEADS
        return next((n for n in choices if n >= num_heads), None)

    def _causal_mask(self) -> torch.Tensor:
        if self._mask is None:
            ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=self.device)
            self._mask = torch.triu(ones, diagonal=1)
        return self._mask

    def _fused_attention(self, q_nope, q_pe, latent_pages, rope_pages, block_size, batch: PagedBatch, q_lens,
                         kv_lens, heads, weights, softmax_scale, prefill: bool):
        """q_nope [B, T, H, nope], q_pe [B, T, H, R] (each sequence's queries first, padding after) -> [B, T, H, v]
        through the MLA form of the fused op."""
        h = q_nope.shape[2]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, weights.w_uk.to(q_nope.dtype))
        # The op takes N of 32/64/128 (128 with sparse_mode 4): extra heads are zero queries, dropped after.
        query = F.pad(q_latent, (0, 0, 0, heads - h)).contiguous()
        query_rope = F.pad(q_pe, (0, 0, 0, heads - h)).to(query.dtype).contiguous()
        # MLA form (2.14 docs, "query_rope和key_rope参数约束"): query D 512 with query_rope D 64, key = value =
        # the latent cache with KV_N 1, key_rope D 64. With BSND the paged cache must be (blocknum, block_size,
        # H); block_table [B, pages] int32 (block ids not checked by the op) and actual_seq_lengths_kv (per
        # batch, required with pages) say which pages and how many keys each sequence has; the table must
        # cover the longest sequence and the pool hold at least the sum of every sequence's pages. Without
        # sparse_mode 4, Q_S is 1-16 and Q_S = 1 takes sparse_mode 0 with no mask. sparse_mode 4 (band) starts
        # at the bottom-right corner of each batch's [actual Q_S, KV_S] score matrix and keeps keys within
        # pre_tokens before and next_tokens after the diagonal: next_tokens 0 with unlimited pre_tokens is
        # causal with the new tokens last, the layout of a chunk that starts mid-sequence; queries past
        # actual_seq_lengths (right padding) are not computed. It takes the 2048 x 2048 mask, True above the
        # diagonal. Key/value/query must be contiguous. The lengths are SymInt[] (host lists).
        extra = dict(sparse_mode=4, atten_mask=self._causal_mask(), pre_tokens=INT32_MAX, next_tokens=0,
                     actual_seq_lengths=q_lens) if prefill else dict(sparse_mode=0)
        table = batch.block_tables if batch.block_tables.dtype == torch.int32 else batch.block_tables.int()
        out, _ = self.npu.npu_fused_infer_attention_score(
            query, latent_pages, latent_pages, query_rope=query_rope, key_rope=rope_pages,
            num_heads=heads, num_key_value_heads=1, input_layout="BSND", scale=softmax_scale,
            block_table=table.contiguous(), block_size=block_size, actual_seq_lengths_kv=kv_lens, **extra)
        return torch.einsum("bthc,hvc->bthv", out[:, :, :h], weights.w_uv.to(out.dtype)).to(q_nope.dtype)

    def _plain_attention(self, inputs: MLAInputs, latent_pages, rope_pages, block_size, batch: PagedBatch,
                         max_query_len: int, max_seq_len: int, weights, softmax_scale):
        """Absorbed MLA in fp32, the cache gathered through the block tables (the reference's math)."""
        latent_rows = latent_pages.view(-1, latent_pages.shape[-1])
        rope_rows = rope_pages.view(-1, rope_pages.shape[-1])
        return paged_attention(inputs, lambda rows: torch.cat((latent_rows[rows], rope_rows[rows]), -1), batch,
                               block_size, max_query_len, max_seq_len, weights, softmax_scale)

    def mla_prefill(self, inputs, cache, batch, weights, softmax_scale):
        num_tokens, h, _ = inputs.q_nope.shape
        rank, rope_dim = inputs.latent.shape[-1], inputs.k_pe.shape[-1]
        latent_pages, rope_pages, block_size = self._pages(cache, rank, rope_dim)
        self._write(latent_pages, rope_pages, block_size, inputs, batch)
        heads = self._fia_heads(h, rank, rope_dim, inputs.q_nope.dtype, block_size, prefill=True)
        if heads is None or batch.max_seq_len > MLA_PREFILL_MAX_KV:
            return self._plain_attention(inputs, latent_pages, rope_pages, block_size, batch, batch.max_query_len,
                                         batch.max_seq_len, weights, softmax_scale)
        # BSND with right padding: sequence b's queries are rows 0 .. q_len_b - 1 of batch b
        seq, _ = batch.token_positions(num_tokens)
        slot = torch.arange(num_tokens, device=seq.device) - batch.query_start.long()[seq]
        padded = [torch.zeros(batch.num_seqs, batch.max_query_len, *t.shape[1:], dtype=t.dtype, device=t.device)
                  for t in (inputs.q_nope, inputs.q_pe)]
        padded[0][seq, slot], padded[1][seq, slot] = inputs.q_nope, inputs.q_pe
        q_lens = batch.query_start.diff().tolist()  # the op takes host lists
        out = self._fused_attention(*padded, latent_pages, rope_pages, block_size, batch, q_lens,
                                    batch.seq_lens.tolist(), heads, weights, softmax_scale, prefill=True)
        return out[seq, slot]

    def mla_decode(self, inputs, cache, batch, weights, softmax_scale, rope=None):
        """The fused path reads seq_lens on the host (the op takes SymInt[] lengths): this backend records no
        graphs (graph_runner gives None), so the step runs eagerly."""
        q_pe, k_pe = self.rotate_for_decode(inputs.q_pe, inputs.k_pe, rope)
        inputs = MLAInputs(inputs.q_nope, q_pe, inputs.latent, k_pe)
        rank, rope_dim = inputs.latent.shape[-1], k_pe.shape[-1]
        latent_pages, rope_pages, block_size = self._pages(cache, rank, rope_dim)
        self._write(latent_pages, rope_pages, block_size, inputs, batch)
        heads = self._fia_heads(inputs.q_nope.shape[1], rank, rope_dim, inputs.q_nope.dtype, block_size,
                                prefill=False)
        if heads is not None:
            return self._fused_attention(inputs.q_nope[:, None], q_pe[:, None], latent_pages, rope_pages, block_size,
                                         batch, None, batch.seq_lens.tolist(), heads, weights, softmax_scale,
                                         prefill=False)[:, 0]
        span = batch.block_tables.shape[1] * block_size
        return self._plain_attention(inputs, latent_pages, rope_pages, block_size, batch, 1, span, weights,
                                     softmax_scale)

    # ---- MoE ---------------------------------------------------------------

    def _gating_fits(self, num_experts: int, bias, config: RoutingConfig) -> bool:
        """npu_moe_gating_top_k's limits on A2/A3 (7.0.0 docs): 256 experts, k in [1, 32], k_group 4, a bias.

        It always renormalizes the chosen weights (yOut = y / (sum(y) + eps) * routed_scaling_factor), so
        only configs that normalize with k > 1 match; group_count 8 is DeepSeek-V3's, as vllm-ascend runs it.
        """
        return (self.fused["moe_gating"] and config.scoring == "sigmoid" and config.method == "noaux_tc"
                and bias is not None and num_experts == GATING_EXPERTS and config.num_groups == GATING_GROUPS
                and config.topk_groups == GATING_TOPK_GROUPS
                and 1 < config.top_k <= 32 and config.normalize)

    def moe_route(self, x, gate_weight, bias, config: RoutingConfig):
        logits = F.linear(x.float(), gate_weight.float())
        if not self._gating_fits(gate_weight.shape[0], bias, config):
            return route_experts(logits, bias, config)
        # norm_type 1: sigmoid; the bias is added for selection only (normValue = normOut + bias); a group
        # scores the sum of its top 2 (group_select_mode 1); the best k_group groups stay; y is normOut at
        # the top-k of normValue, renormalized and scaled. bias has x's dtype (float32 here). The expert
        # index comes back as int32 (2.14 docs; ops-transformer aclnnMoeGatingTopK for the step order).
        weights, ids, _ = self.npu.npu_moe_gating_top_k(
            logits, config.top_k, bias=bias.float(), k_group=config.topk_groups, group_count=config.num_groups,
            group_select_mode=1, renorm=0, norm_type=1, out_flag=False,
            routed_scaling_factor=config.scaling, eps=1e-20)
        return weights.float(), ids.long()

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        x = plain(x)
        num_experts = experts.num_experts
        if (not self.fused["moe_experts"] or experts.is_fp8 or "gate_up_kn" not in experts.extra
                or num_experts > MOE_MAX_EXPERTS):
            return self._plain.moe_experts(x, weights, ids, experts)
        tokens, top_k = ids.shape
        # npu_grouped_matmul's group sizes must add up to x's rows (2.14 docs, group_type 0), so a skipped pair
        # (id -1) cannot leave the GEMM without a host sync: it runs on expert 0 and its output is dropped
        # below. It still costs a row here, unlike on the Triton backends.
        skipped = ids < 0
        # Dropless routing (drop_pad_mode 0, quant_mode -1): expert_idx must be int32 [N, K]; it is flattened
        # row-major and sorted by expert; expanded_x [N*K, D] holds the tokens grouped by expert, and with
        # row_idx_type 0 expanded_row_idx[n*K + k] is the row of expanded_x holding token n's copy for its
        # k-th expert. expert_tokens_num_type 1 gives per-expert counts, int64 (only 1 and 2 are supported,
        # and expert_tokens_num_flag must be True). (2.14 docs; aclnnMoeInitRoutingV2.)
        expanded_x, expanded_row_idx, counts, _ = self.npu.npu_moe_init_routing_v2(
            x, ids.clamp(min=0).to(torch.int32), active_num=tokens * top_k, expert_num=num_experts, drop_pad_mode=0,
            expert_tokens_num_type=1, expert_tokens_num_flag=True, active_expert_range=[0, num_experts],
            quant_mode=-1, row_idx_type=0)
        # One x and one weight [E, K, N] with group_type 0 and split_item 2/3 give one y; group_list_type 1
        # reads group_list as per-group row counts (0 would read a cumsum); int64, at most 1024 groups.
        gmm = dict(group_list=counts.to(torch.int64), group_list_type=1, group_type=0, split_item=2)
        gate_up = self.npu.npu_grouped_matmul([expanded_x], [experts.extra["gate_up_kn"].to(x.dtype)], **gmm)[0]
        hidden = self.npu.npu_swiglu(gate_up, dim=-1)  # silu(first half) * second half: gate rows come first
        down = self.npu.npu_grouped_matmul([hidden], [experts.extra["down_kn"].to(x.dtype)], **gmm)[0]
        # The unpermute is a gather + weighted sum in fp32: the two torch_npu docs of npu_moe_token_unpermute
        # disagree on which way sorted_indices maps, and npu_moe_finalize_routing had accuracy problems in
        # vllm-ascend, so neither is relied on.
        per_choice = down[expanded_row_idx.long()].view(tokens, top_k, -1).float()
        weighted = torch.where(skipped[..., None], 0.0, per_choice * weights[..., None])  # where: NaN rows too
        return weighted.sum(dim=1).to(x.dtype)
