"""A CPU emulation of the torch_npu ops dsv3's Ascend backend calls, written from torch_npu's documentation.

This is not torch_npu. The tests load it in place of `torch_npu` (see the `npu_emulation` fixtures) so that
backends/ascend.py can run without an NPU. Each op follows the semantics its documentation states and
checks the documented limits the backend relies on, raising EmulationError where a real 910B would reject
the call; anything beyond what the backend calls raises NotImplementedError. It is an independent check:
nothing here imports dsv3 or backends.

Sources: torch_npu/_op_plugin_docs.py in the torch-npu 2.14.0 wheel ("the 2.14 docs"); the torch_npu API
reference for Ascend Extension for PyTorch 7.0.0 on hiascend.com ("the 7.0.0 docs", for the A2/A3 limits
of npu_moe_gating_top_k); the CANN aclnn pages of MoeGatingTopK and MoeInitRoutingV2; the op-plugin test
test_npu_add_rms_norm.py (npu_add_rms_norm is not in the 2.14 docs file).
"""

from __future__ import annotations

import collections
from types import SimpleNamespace

import torch

DSV3_EMULATION = "emulated: tests/npu_emulation on the CPU"
#: how many times each op was called (tests use it to see which path ran)
CALLS: collections.Counter = collections.Counter()
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class EmulationError(RuntimeError):
    """The call breaks a limit the op's documentation states."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EmulationError(message)


def _contiguous(name: str, tensor: torch.Tensor) -> None:
    _check(tensor.is_contiguous(), f"{name} must be contiguous (the op does not take non-contiguous tensors)")


# ---- device queries (torch_npu.npu) ------------------------------------------------------------------

class _Npu:
    """torch_npu.npu's device queries, answering for one emulated 910B."""

    device_name = "Ascend910B2"
    total_memory = 64 << 30

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def get_device_name(self, index: int = 0) -> str:
        return self.device_name

    def get_device_properties(self, index: int = 0):
        return SimpleNamespace(name=self.device_name, total_memory=self.total_memory)


npu = _Npu()
#: torch_npu._C._npu_get_soc_version(): 223 is a 910B2 (SoC ids 220-225 are 910B)
_C = SimpleNamespace(_npu_get_soc_version=lambda: 223)


# ---- norms, rope, activation --------------------------------------------------------------------------

def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """y = x / sqrt(mean(x^2) + eps) * gamma over gamma's dims, and rstd = 1 / sqrt(mean(x^2) + eps).

    Documented: float16/bfloat16/float32; gamma has self's dtype; self is 2-8-D; gamma is normally self's
    last dim. Computed in float32 here; rstd is float32.
    """
    CALLS["npu_rms_norm"] += 1
    _check(self.dtype in _FLOATS, f"npu_rms_norm: dtype {self.dtype} not supported")
    _check(gamma.dtype == self.dtype, f"npu_rms_norm: gamma dtype {gamma.dtype} differs from self's {self.dtype}")
    _check(2 <= self.dim() <= 8, f"npu_rms_norm: self must be 2-8-D, got {self.dim()}-D")
    _check(tuple(self.shape[-gamma.dim():]) == tuple(gamma.shape), "npu_rms_norm: gamma must match self's last dims")
    dims = tuple(range(-gamma.dim(), 0))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """(rms_norm(x1 + x2), rstd, x1 + x2): the sum is kept in the input dtype (op-plugin test)."""
    CALLS["npu_add_rms_norm"] += 1
    _check(x1.shape == x2.shape and x1.dtype == x2.dtype, "npu_add_rms_norm: x1 and x2 must match in shape and dtype")
    summed = x1 + x2
    y, rstd = npu_rms_norm(summed, gamma, epsilon)
    CALLS["npu_rms_norm"] -= 1
    return y, rstd, summed


def _rope_layout(x: torch.Tensor, r1: torch.Tensor) -> str:
    """Interleave mode takes r1 as 11SD (x BNSD), 1S1D (x BSND) or S11D (x SBND)."""
    for layout, axis in (("BNSD", 2), ("BSND", 1), ("SBND", 0)):
        shape = [1, 1, 1, x.shape[-1]]
        shape[axis] = x.shape[axis]
        if list(r1.shape) == shape:
            return layout
    raise EmulationError(f"npu_rotary_mul interleave: r1 {list(r1.shape)} is not 11SD, 1S1D or S11D for "
                         f"input {list(x.shape)}")


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate: torch.Tensor | None = None) -> torch.Tensor:
    """output = r1 * input + r2 * x_new.

    half: x1, x2 = chunk(input, 2, -1); x_new = cat(-x2, x1).
    interleave: x1 = input[..., ::2], x2 = input[..., 1::2]; x_new = stack((-x2, x1), -1) flattened, so
    x_new[2i] = -input[2i+1] and x_new[2i+1] = input[2i].
    Documented: 4-D input, r1 and r2 4-D; D even and < 896; interleave takes r1 as 11SD/1S1D/S11D and
    B * N < 1000.
    """
    CALLS["npu_rotary_mul"] += 1
    if rotate is not None:
        raise NotImplementedError("npu_rotary_mul with `rotate` is not emulated")
    _check(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "npu_rotary_mul: input, r1 and r2 must be 4-D")
    _check(input.dtype in _FLOATS and r1.dtype == input.dtype and r2.dtype == input.dtype,
           "npu_rotary_mul: input, r1 and r2 must share a float16/bfloat16/float32 dtype")
    _check(r1.shape == r2.shape, "npu_rotary_mul: r1 and r2 must have one shape")
    d = input.shape[-1]
    _check(d % 2 == 0 and d < 896, f"npu_rotary_mul: D must be even and < 896, got {d}")
    if rotary_mode == "interleave":
        layout = _rope_layout(input, r1)
        batch, heads = {"BNSD": (0, 1), "BSND": (0, 2), "SBND": (1, 2)}[layout]
        _check(input.shape[batch] * input.shape[heads] < 1000, "npu_rotary_mul interleave: B * N must be < 1000")
        x_new = torch.stack((-input[..., 1::2], input[..., 0::2]), dim=-1).flatten(-2)
    elif rotary_mode == "half":
        first, second = input.chunk(2, dim=-1)
        x_new = torch.cat((-second, first), dim=-1)
    else:
        raise EmulationError(f"npu_rotary_mul: rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    return (r1.float() * input.float() + r2.float() * x_new.float()).to(input.dtype)


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """swish(A) * B = A * sigmoid(A) * B, with A and B the two halves of x along dim."""
    CALLS["npu_swiglu"] += 1
    _check(self.dtype in _FLOATS, f"npu_swiglu: dtype {self.dtype} not supported")
    _check(self.shape[dim] % 2 == 0, "npu_swiglu: the split dim must have an even size")
    a, b = self.float().chunk(2, dim=dim)
    return (a * torch.sigmoid(a) * b).to(self.dtype)


# ---- MoE ----------------------------------------------------------------------------------------------

def npu_moe_gating_top_k(x: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, input_ids=None,
                         tid2eid=None, k_group: int = 1, group_count: int = 1, group_select_mode: int = 0,
                         renorm: int = 0, norm_type: int = 0, out_flag: bool = False,
                         routed_scaling_factor: float = 1.0, eps: float = 1e-20):
    """DeepSeek-style grouped top-k (aclnnMoeGatingTopK's steps).

    normOut = sigmoid(x) (norm_type 1) or softmax(x) (0); normValue = normOut + bias; a group scores its max
    (group_select_mode 0) or the sum of its top 2 (1) of normValue; all but the best k_group groups are set
    to -inf; expert_idx = top-k of normValue; y = normOut at expert_idx; yOut = y / (sum(y) + eps) *
    routed_scaling_factor. Returns (yOut in x's dtype, expert_idx int32, normOut float32).

    Limits: x 2-D, E <= 2048, E divisible by group_count with more than 2 per group, align32(E/group_count)
    * group_count <= 2048, 1 <= k_group <= group_count, 1 <= k <= E/group_count * k_group, renorm 0, bias
    [E] of x's dtype (2.14 docs); on A2/A3 also E = 256, k in [1, 32], k_group = 4 and a bias (7.0.0 docs).
    """
    CALLS["npu_moe_gating_top_k"] += 1
    if input_ids is not None or tid2eid is not None:
        raise NotImplementedError("npu_moe_gating_top_k hash mode (input_ids/tid2eid) is not emulated")
    _check(x.dim() == 2 and x.dtype in _FLOATS, "npu_moe_gating_top_k: x must be 2-D float16/bfloat16/float32")
    tokens, experts = x.shape
    _check(experts <= 2048, f"npu_moe_gating_top_k: at most 2048 experts, got {experts}")
    _check(group_count > 0 and experts % group_count == 0 and experts // group_count > 2,
           f"npu_moe_gating_top_k: {experts} experts do not split into {group_count} groups of more than 2")
    per_group = experts // group_count
    _check(-(-per_group // 32) * 32 * group_count <= 2048,
           "npu_moe_gating_top_k: align32(E / group_count) * group_count > 2048")
    _check(1 <= k_group <= group_count, f"npu_moe_gating_top_k: k_group must be in [1, group_count], got {k_group}")
    _check(1 <= k <= per_group * k_group, f"npu_moe_gating_top_k: k must be in [1, {per_group * k_group}], got {k}")
    _check(renorm == 0, "npu_moe_gating_top_k: only renorm 0 is supported")
    _check(norm_type in (0, 1), f"npu_moe_gating_top_k: norm_type must be 0 or 1, got {norm_type}")
    _check(group_select_mode in (0, 1), f"npu_moe_gating_top_k: group_select_mode 0 or 1, got {group_select_mode}")
    # Atlas A2 (910B) and A3 (910C) limits.
    _check(experts == 256, f"npu_moe_gating_top_k on A2/A3: only 256 experts, got {experts}")
    _check(1 <= k <= 32, f"npu_moe_gating_top_k on A2/A3: k in [1, 32], got {k}")
    _check(k_group == 4, f"npu_moe_gating_top_k on A2/A3: k_group must be 4, got {k_group}")
    _check(bias is not None, "npu_moe_gating_top_k on A2/A3: bias must not be None")
    _check(bias.shape == (experts,) and bias.dtype == x.dtype, "npu_moe_gating_top_k: bias must be [E] of x's dtype")

    norm_out = torch.sigmoid(x.float()) if norm_type == 1 else torch.softmax(x.float(), dim=-1)
    value = norm_out + bias.float()
    grouped = value.view(tokens, group_count, per_group)
    if group_select_mode == 1:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_score = grouped.max(dim=-1).values
    keep = torch.zeros(tokens, group_count, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(k_group, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    expert_idx = masked.topk(k, dim=-1).indices
    y = norm_out.gather(1, expert_idx)
    y_out = y / (y.sum(dim=-1, keepdim=True) + eps) * routed_scaling_factor
    return y_out.to(x.dtype), expert_idx.to(torch.int32), norm_out


def npu_moe_init_routing_v2(x: torch.Tensor, expert_idx: torch.Tensor, *, scale=None, offset=None,
                            active_num: int = -1, expert_capacity: int = -1, expert_num: int = -1,
                            drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = -1,
                            active_expert_range=(), row_idx_type: int = 0):
    """Dropless MoE routing: sort the (token, choice) pairs by expert.

    expert_idx [N, K] is flattened row-major (pair f = n*K + k) and stably sorted by expert id:
    sortedRowIdx; pairs whose expert lies outside active_expert_range [start, end) are dropped, leaving
    `available` pairs. expanded_x[i] = x[sortedRowIdx[i] // K] for i < available (rows after are undefined:
    zeros here). expanded_row_idx: row_idx_type 0 ("gather" index) is expandedRowIdx[sortedRowIdx[i]] = i
    with -1 for dropped pairs; row_idx_type 1 ("scatter" index) is sortedRowIdx itself in its first
    `available` entries (undefined after). expert_tokens_num_type 1 gives int64 counts per expert of the
    range. (The aclnn page's x[sortedRowIdx[i] % NUM_ROWS] is carried over from V1, whose row index was
    k-major; for V2's row-major flatten the token of pair f is f // K, as vllm-ascend pairs
    expanded_row_idx with probs [N, K].)

    Limits: x 2-D; expert_idx 2-D int32 with ids below expert_num; drop_pad_mode 0; expert_tokens_num_type
    1 or 2 with expert_tokens_num_flag True; quant_mode -1 or 1; 0 < expert_num <= 10240; 0 <= start <
    end <= expert_num (2.14 docs). Emulated: quant_mode -1, count mode, active_num covering every pair.
    """
    CALLS["npu_moe_init_routing_v2"] += 1
    _check(x.dim() == 2 and x.dtype in _FLOATS, "npu_moe_init_routing_v2: x must be 2-D float16/bfloat16/float32")
    _check(expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0],
           "npu_moe_init_routing_v2: expert_idx must be [NUM_ROWS, K]")
    _check(expert_idx.dtype == torch.int32,
           f"npu_moe_init_routing_v2: expert_idx must be int32, got {expert_idx.dtype}")
    _check(drop_pad_mode == 0, "npu_moe_init_routing_v2: only drop_pad_mode 0 (dropless) is supported")
    _check(expert_tokens_num_type in (1, 2), "npu_moe_init_routing_v2: expert_tokens_num_type must be 1 or 2")
    _check(expert_tokens_num_flag, "npu_moe_init_routing_v2: expert_tokens_num_flag must be True")
    _check(quant_mode in (-1, 1), "npu_moe_init_routing_v2: quant_mode must be -1 or 1")
    _check(0 < expert_num <= 10240, f"npu_moe_init_routing_v2: expert_num must be in (0, 10240], got {expert_num}")
    _check(row_idx_type in (0, 1), "npu_moe_init_routing_v2: row_idx_type must be 0 or 1")
    if quant_mode == 1 or expert_tokens_num_type == 2 or offset is not None:
        raise NotImplementedError("npu_moe_init_routing_v2: only quant_mode -1 with count mode is emulated")
    tokens, top_k = expert_idx.shape
    pairs = tokens * top_k
    if active_num not in (-1, 0) and active_num < pairs:
        raise NotImplementedError("npu_moe_init_routing_v2: an active_num below NUM_ROWS * K is not emulated")
    start, end = list(active_expert_range) or [0, expert_num]
    _check(0 <= start < end <= expert_num, f"npu_moe_init_routing_v2: bad active_expert_range {[start, end]}")
    flat = expert_idx.flatten().long()
    _check(bool(((flat >= 0) & (flat < expert_num)).all()), "npu_moe_init_routing_v2: expert id out of range")

    sorted_pairs = torch.sort(flat, stable=True).indices
    sorted_experts = flat[sorted_pairs]
    sorted_pairs = sorted_pairs[(sorted_experts >= start) & (sorted_experts < end)]
    available = sorted_pairs.numel()
    expanded_x = torch.zeros(pairs, x.shape[1], dtype=x.dtype)
    expanded_x[:available] = x[sorted_pairs // top_k]
    if row_idx_type == 0:
        expanded_row_idx = torch.full((pairs,), -1, dtype=torch.int32)
        expanded_row_idx[sorted_pairs] = torch.arange(available, dtype=torch.int32)
    else:
        expanded_row_idx = torch.zeros(pairs, dtype=torch.int32)
        expanded_row_idx[:available] = sorted_pairs.to(torch.int32)
    in_range = flat[(flat >= start) & (flat < end)] - start
    counts = torch.bincount(in_range, minlength=end - start).to(torch.int64)
    expanded_scale = torch.zeros(pairs, dtype=torch.float32)
    if scale is not None:
        _check(scale.shape == (tokens,) and scale.dtype == torch.float32,
               "npu_moe_init_routing_v2: scale must be float32 [NUM_ROWS]")
        expanded_scale[:available] = scale[sorted_pairs // top_k]
    return expanded_x, expanded_row_idx, counts, expanded_scale


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item: int = 0,
                       group_type: int | None = None, group_list_type: int = 0, act_type: int = 0,
                       output_dtype=None, tuning_config=None):
    """y_i = x_i x weight_i for the row groups of one x over one 3-D weight [G, K, N].

    Emulated: group_type 0 with split_item 2 or 3 (one x, one weight, one y), non-quantized. group_list is
    an int64 tensor of length G (at most 1024 groups): group_list_type 0 reads it as a non-decreasing
    cumsum whose last value is M, 1 as row counts summing to M. A transposed weight view is accepted. x
    and each weight's last dim must stay below 65536 (2.14 docs).
    """
    CALLS["npu_grouped_matmul"] += 1
    unsupported = dict(bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                       antiquant_offset=antiquant_offset, per_token_scale=per_token_scale,
                       activation_input=activation_input, activation_quant_scale=activation_quant_scale,
                       activation_quant_offset=activation_quant_offset)
    if any(v is not None for v in unsupported.values()) or act_type != 0 or group_type != 0:
        raise NotImplementedError("npu_grouped_matmul: only the non-quantized group_type 0 call is emulated")
    _check(split_item in (2, 3), "npu_grouped_matmul group_type 0: split_item must be 2 or 3")
    _check(len(x) == 1 and len(weight) == 1, "npu_grouped_matmul: emulated with one x and one weight")
    a, w = x[0], weight[0]
    _check(a.dim() == 2 and w.dim() == 3, "npu_grouped_matmul group_type 0: x must be 2-D and weight 3-D")
    _check(a.dtype in _FLOATS and w.dtype == a.dtype, "npu_grouped_matmul: x and weight must share a float dtype")
    groups, k, n = w.shape
    _check(a.shape[1] == k, f"npu_grouped_matmul: x has K={a.shape[1]}, weight has K={k}")
    _check(k < 65536 and n < 65536, "npu_grouped_matmul: inner dims must be below 65536")
    _check(output_dtype in (None, a.dtype), "npu_grouped_matmul: output_dtype must be None or x's dtype")
    _check(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
           "npu_grouped_matmul: group_list must be a 1-D int64 tensor")
    _check(group_list.numel() == groups and groups <= 1024,
           "npu_grouped_matmul: one group_list entry per group, at most 1024")
    _check(group_list_type in (0, 1), "npu_grouped_matmul: group_list_type must be 0 or 1")
    values = group_list.tolist()
    if group_list_type == 0:
        _check(all(v >= 0 for v in values) and values == sorted(values),
               "npu_grouped_matmul: a cumsum group_list must be non-decreasing")
        ends = values
    else:
        _check(all(v >= 0 for v in values), "npu_grouped_matmul: counts must be non-negative")
        ends = torch.tensor(values).cumsum(0).tolist()
    _check(ends[-1] == a.shape[0], f"npu_grouped_matmul: group_list covers {ends[-1]} rows, x has {a.shape[0]}")
    y = torch.empty(a.shape[0], n, dtype=a.dtype)
    begin = 0
    for g, end in enumerate(ends):
        y[begin:end] = (a[begin:end].float() @ w[g].float()).to(a.dtype)
        begin = end
    return [y]


# ---- attention ----------------------------------------------------------------------------------------

_FIA = "npu_fused_infer_attention_score"
_FIA_NOT_EMULATED = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2",
                     "quant_offset2", "antiquant_scale", "antiquant_offset", "query_padding_size",
                     "kv_padding_size", "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale",
                     "value_antiquant_offset", "key_shared_prefix", "value_shared_prefix",
                     "actual_shared_prefix_len", "key_rope_antiquant_scale")


def _lengths(values, batch: int, default: int, name: str) -> list[int]:
    """A per-batch length list: None -> default; one value -> every batch; else the first `batch` values."""
    if values is None:
        return [default] * batch
    values = [int(v) for v in values]
    _check(len(values) == 1 or len(values) >= batch,
           f"{_FIA}: {name} has {len(values)} values for batch {batch}")
    return values * batch if len(values) == 1 else values[:batch]


def _check_causal_mask(mask) -> None:
    _check(mask is not None, f"{_FIA}: sparse_mode 2/3/4 needs atten_mask")
    _check(mask.dtype in (torch.bool, torch.int8, torch.uint8), f"{_FIA}: atten_mask must be bool/int8/uint8")
    _check(tuple(mask.shape[-2:]) == (2048, 2048) and mask.dim() in (2, 3, 4) and mask.numel() == 2048 * 2048,
           f"{_FIA}: sparse_mode 2/3/4 take a (2048, 2048) mask")
    expected = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    _check(torch.equal(mask.reshape(2048, 2048).bool(), expected),
           f"{_FIA}: the optimized mask must be lower-triangular (True above the diagonal)")


def npu_fused_infer_attention_score(query, key, value, *, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, block_table=None, query_rope=None, key_rope=None,
                                    num_heads: int = 1, scale: float = 1.0, pre_tokens: int = 2147483647,
                                    next_tokens: int = 2147483647, input_layout: str = "BSH",
                                    num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0,
                                    block_size: int = 0, antiquant_mode: int = 0, softmax_lse_flag: bool = False,
                                    key_antiquant_mode: int = 0, value_antiquant_mode: int = 0, **others):
    """attention_out = softmax(scale * (query . key + query_rope . key_rope) + mask) . value, in the MLA form.

    Emulated: the MLA call (query_rope and key_rope given) with input_layout BSND or BNSD and the key/value
    either dense (BSND/BNSD like the query) or paged: (blocknum, block_size, KV_N * D) with BSND, also
    (blocknum, KV_N, block_size, D) with BNSD, selected per batch by block_table [B, pages] int32 and cut to
    actual_seq_lengths_kv (required with pages). Block ids are not checked (any page may appear in several
    rows of the table); the table must cover the longest sequence and blocknum be at least the pages of all
    batches together (the sum of ceil(actual_seq_lengths_kv / block_size)). Query head n reads key head
    n // (N / KV_N).
    Masks: sparse_mode 0 without atten_mask (no mask); 3 (rightDownCausal): query i of batch b sees keys
    j <= i + KV_S_b - Q_S_b; 4 (band from the bottom-right corner): with p = i + KV_S_b - Q_S_b, keys
    p - pre_tokens <= j <= p + next_tokens. A query with no key, or past actual_seq_lengths, gives zeros.
    Q_S = 1 ignores actual_seq_lengths. The output has the query's shape and dtype.

    MLA limits (2.14 docs): query/key/value/query_rope/key_rope contiguous, float16/bfloat16, key and value
    one shape, query_rope like the query, key_rope like the key; key N 1, D 512, rope D 64. Without
    sparse_mode 4: Q_S 1-16, N in {32, 64, 128}, paged (block_size 16 or 128), Q_S = 1 with sparse_mode 0
    and no mask, Q_S > 1 with sparse_mode 3 and a mask. With sparse_mode 4: N 128, BSND only, key S <=
    131088, block_size 64 or 128 when paged, the (2048, 2048) mask.
    """
    CALLS[_FIA] += 1
    given = [name for name in _FIA_NOT_EMULATED if others.get(name) is not None]
    unknown = sorted(set(others) - set(_FIA_NOT_EMULATED))
    if given or unknown or antiquant_mode or key_antiquant_mode or value_antiquant_mode:
        raise NotImplementedError(f"{_FIA}: {given or unknown or 'antiquant'} not emulated")
    if query_rope is None and key_rope is None:
        raise NotImplementedError(f"{_FIA}: only the MLA form (query_rope/key_rope) is emulated")
    _check(query_rope is not None and key_rope is not None, f"{_FIA}: query_rope and key_rope go together")
    if input_layout not in ("BSND", "BNSD"):
        raise NotImplementedError(f"{_FIA}: layout {input_layout} not emulated")
    for name, tensor in (("query", query), ("key", key), ("value", value), ("query_rope", query_rope),
                         ("key_rope", key_rope)):
        _contiguous(f"{_FIA}: {name}", tensor)
    _check(query.dtype in (torch.float16, torch.bfloat16), f"{_FIA}: MLA query must be float16/bfloat16")
    _check(query_rope.dtype == query.dtype and key_rope.dtype == key.dtype and value.dtype == key.dtype,
           f"{_FIA}: query_rope must match query's dtype, key_rope and value key's")
    _check(key.shape == value.shape, f"{_FIA}: key and value must have one shape")

    bsnd = query if input_layout == "BSND" else query.transpose(1, 2)
    rope_bsnd = query_rope if input_layout == "BSND" else query_rope.transpose(1, 2)
    batch, q_s, heads, d = bsnd.shape
    kv_heads = num_key_value_heads or num_heads
    _check(heads == num_heads, f"{_FIA}: num_heads {num_heads} but the query has {heads}")
    _check(rope_bsnd.shape[:3] == bsnd.shape[:3], f"{_FIA}: query_rope must share B, S, N with the query")
    _check(d == 512 and rope_bsnd.shape[-1] == 64, f"{_FIA}: MLA needs query D 512 and query_rope D 64")
    _check(kv_heads == 1, f"{_FIA}: MLA needs key N 1, got {kv_heads}")
    paged = block_table is not None
    if sparse_mode == 4:
        _check(heads == 128, f"{_FIA} sparse_mode 4: N must be 128, got {heads}")
        _check(input_layout == "BSND", f"{_FIA} sparse_mode 4: only BSND")
        _check(not paged or block_size in (64, 128), f"{_FIA} sparse_mode 4: block_size 64 or 128")
        _check_causal_mask(atten_mask)
    else:
        _check(1 <= q_s <= 16, f"{_FIA}: MLA without sparse_mode 4 needs Q_S 1-16, got {q_s}")
        _check(heads in (32, 64, 128), f"{_FIA}: MLA needs N 32, 64 or 128, got {heads}")
        _check(paged and block_size in (16, 128), f"{_FIA}: MLA without sparse_mode 4 needs "
                                                 "page attention with block_size 16 or 128")
        if q_s == 1:
            _check(sparse_mode == 0 and atten_mask is None, f"{_FIA}: MLA with Q_S 1 takes "
                                                            "sparse_mode 0 without a mask")
        else:
            _check(sparse_mode == 3, f"{_FIA}: MLA with Q_S > 1 takes sparse_mode 3 or 4")
            _check_causal_mask(atten_mask)

    if paged:
        _check(block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.shape[0] == batch,
               f"{_FIA}: block_table must be int32 [B, pages]")
        _check(actual_seq_lengths_kv is not None, f"{_FIA}: page attention needs actual_seq_lengths_kv")
        if key.dim() == 3:
            _check(key.shape[1] == block_size and key_rope.shape[1] == block_size,
                   f"{_FIA}: paged key must be (blocknum, block_size, H)")
            as_pages = lambda t: t.view(t.shape[0], block_size, kv_heads, -1)  # noqa: E731
        else:
            _check(input_layout == "BNSD" and key.shape[2] == block_size, f"{_FIA}: a "
                   "(blocknum, KV_N, block_size, D) cache needs BNSD")
            as_pages = lambda t: t.transpose(1, 2)  # noqa: E731
        kv_lens = _lengths(actual_seq_lengths_kv, batch, 0, "actual_seq_lengths_kv")
        _check(max(kv_lens) <= block_table.shape[1] * block_size, f"{_FIA}: block_table too short")
        pages_needed = sum(-(-n // block_size) for n in kv_lens)
        _check(key.shape[0] >= pages_needed, f"{_FIA}: blocknum {key.shape[0]} is less than the {pages_needed} "
                                             "pages actual_seq_lengths_kv needs over the batches")
        keys, values, ropes = ([as_pages(t)[block_table[b].long()].flatten(0, 1) for b in range(batch)]
                               for t in (key, value, key_rope))
    else:
        as_bsnd = (lambda t: t) if input_layout == "BSND" else (lambda t: t.transpose(1, 2))  # noqa: E731
        keys, values, ropes = (list(as_bsnd(t)) for t in (key, value, key_rope))
        kv_lens = _lengths(actual_seq_lengths_kv, batch, keys[0].shape[0], "actual_seq_lengths_kv")
    _check(keys[0].shape[1] == kv_heads and keys[0].shape[-1] == 512 and ropes[0].shape[-1] == 64,
           f"{_FIA}: MLA needs key N 1, D 512 and key_rope D 64")
    if sparse_mode == 4:
        _check(max(kv_lens) <= 131088, f"{_FIA} sparse_mode 4: key S at most 131088")
    q_lens = [1] * batch if q_s == 1 else _lengths(actual_seq_lengths, batch, q_s, "actual_seq_lengths")

    out = torch.zeros(batch, q_s, heads, d, dtype=query.dtype)
    group = heads // kv_heads
    for b in range(batch):
        q_len, kv_len = q_lens[b], kv_lens[b]
        k, v, r = (t[b][:kv_len].float().repeat_interleave(group, dim=1) for t in (keys, values, ropes))  # [KV_S, N, *]
        scores = (torch.einsum("snd,tnd->nst", bsnd[b, :q_len].float(), k)
                  + torch.einsum("snd,tnd->nst", rope_bsnd[b, :q_len].float(), r)) * scale
        aligned = torch.arange(q_len)[:, None] + kv_len - q_len            # the bottom-right diagonal
        keys_at = torch.arange(kv_len)[None, :]
        if sparse_mode == 3:
            allowed = keys_at <= aligned
        elif sparse_mode == 4:
            allowed = (keys_at >= aligned - pre_tokens) & (keys_at <= aligned + next_tokens)
        else:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
        probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
        probs = probs.masked_fill(~allowed.any(dim=-1)[None, :, None], 0.0)   # a query with no key gives zeros
        out[b, :q_len] = torch.einsum("nst,tnd->snd", probs, v).to(query.dtype)
    attention_out = out if input_layout == "BSND" else out.transpose(1, 2).contiguous()
    if softmax_lse_flag:
        raise NotImplementedError(f"{_FIA}: softmax_lse is not emulated")
    return attention_out, torch.zeros(1, dtype=torch.float32)
