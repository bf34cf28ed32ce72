"""MoE routing in one kernel: gate logits [N, E] to (weights [N, k], ids [N, k]).

The numerics are those of backends/reference.route_experts (V3 noaux_tc, V2
group_limited_greedy, V2-Lite greedy), which takes about a dozen small torch
launches per MoE layer; in the decode step those launches cost more than the
math. Here one program routes one token:

1. scores = sigmoid or softmax of the logits; choice = scores + bias (the bias
   only selects, as in the reference).
2. The experts are held as a [GROUPS, GROUP_SIZE] tile, each side padded to a
   power of two with -inf lanes, so that any group size fits (V2's 160 / 8 = 20
   too). A group scores the sum of its two best choices (noaux_tc) or its best
   (group_limited_greedy); the topk_groups best groups stay, the others go to -inf.
3. Top-k by repeated argmax: take the max, then the lowest expert index that
   holds it, and mask it out. Ids come out in descending order of choice, as
   torch.topk gives them (exact ties go to the lower index).
4. weights = the unbiased scores of the chosen experts, normalized as the
   reference does, times the scaling factor.

No host sync and fixed output sizes, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from dsv3.backends.interface import RoutingConfig
from dsv3.backends.reference import route_experts

MAX_LANES = 1024  # padded experts one program holds; beyond it, the reference path


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_logits, scaling,
                  NUM_EXPERTS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                  TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr,
                  GROUP_TOP2: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, BLOCK_G)[:, None]
    slot = tl.arange(0, BLOCK_S)[None, :]
    valid = (group < NUM_GROUPS) & (slot < GROUP_SIZE)
    expert = tl.where(valid, group * GROUP_SIZE + slot, NUM_EXPERTS)  # NUM_EXPERTS marks a padding lane

    logits = tl.load(logits_ptr + token * stride_logits + expert, mask=valid, other=float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        exps = tl.exp(logits - tl.max(logits))
        scores = exps / tl.sum(exps)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=valid, other=0.0)
    # NaN ranks above everything, as in torch.topk: a NaN token still picks distinct experts (NaN weights)
    choice = tl.where(valid, tl.where(choice != choice, float("inf"), choice), float("-inf"))

    if NUM_GROUPS > 1:
        if GROUP_TOP2:  # the best plus the best of the rest (the first holder of the best masked out)
            best = tl.max(choice, axis=1)
            first = tl.min(tl.where(choice == best[:, None], slot, BLOCK_S), axis=1)
            group_score = best + tl.max(tl.where(slot == first[:, None], float("-inf"), choice), axis=1)
        else:
            group_score = tl.max(choice, axis=1)
        groups = tl.arange(0, BLOCK_G)
        kept = tl.zeros((BLOCK_G,), dtype=tl.int1)
        for _ in range(TOPK_GROUPS):  # argmax, the lowest group on ties
            pick = tl.min(tl.where(group_score == tl.max(group_score), groups, BLOCK_G))
            kept = kept | (groups == pick)
            group_score = tl.where(groups == pick, float("-inf"), group_score)
        choice = tl.where(kept[:, None], choice, float("-inf"))

    LANES: tl.constexpr = BLOCK_G * BLOCK_S
    choice = tl.reshape(choice, (LANES,))
    expert = tl.reshape(expert, (LANES,))
    rank = tl.full((LANES,), BLOCK_K, dtype=tl.int32)  # j for the j-th expert chosen
    out = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for j in range(TOP_K):  # argmax, the lowest expert on ties
        pick = tl.min(tl.where(choice == tl.max(choice), expert, NUM_EXPERTS))
        pick = tl.minimum(pick, NUM_EXPERTS - 1)  # an id in range whatever the input
        rank = tl.where(expert == pick, j, rank)
        ids = tl.where(out == j, pick.to(tl.int64), ids)
        choice = tl.where(expert == pick, float("-inf"), choice)

    scores = tl.reshape(scores, (LANES,))
    weights = tl.sum(tl.where(rank[None, :] == out[:, None], scores[None, :], 0.0), axis=1)
    if NORMALIZE:
        weights = weights / (tl.sum(weights) + 1e-20)
    tl.store(weights_ptr + token * TOP_K + out, weights * scaling, mask=out < TOP_K)
    tl.store(ids_ptr + token * TOP_K + out, ids, mask=out < TOP_K)


def _grouping(num_experts: int, config: RoutingConfig) -> tuple[int, int] | None:
    """(groups, group size) the kernel routes this config with, or None where it leaves it to the reference."""
    if config.scoring not in ("sigmoid", "softmax") or config.method not in ("noaux_tc", "group_limited_greedy",
                                                                            "greedy"):
        return None  # the reference raises the error
    groups = config.num_groups if config.method != "greedy" and config.num_groups > 1 else 1
    if groups > 1 and (num_experts % groups or not 1 <= config.topk_groups <= groups
                       or (config.method == "noaux_tc" and num_experts // groups < 2)):
        return None
    group_size = num_experts // groups
    selectable = (config.topk_groups if groups > 1 else 1) * group_size
    if not 1 <= config.top_k <= selectable:
        return None
    if triton.next_power_of_2(groups) * triton.next_power_of_2(group_size) > MAX_LANES:
        return None
    return groups, group_size


def route(logits: torch.Tensor, bias: torch.Tensor | None, config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing, one Triton program per token; the semantics of dsv3.backends.reference.route_experts.

    Cases the kernel does not take go to route_experts itself (same results, a dozen launches):
    more than MAX_LANES experts after padding groups and group size to powers of two (E > 1024 for
    one group), top_k above the experts the kept groups hold (E itself without groups), E not
    divisible into num_groups, noaux_tc with groups of one expert, an unknown scoring or method
    (the reference raises), logits that are not float32 [N, E] or no tokens.

    Args:
        logits: float32 [N, E] gate logits.
        bias: float32 [E] correction bias (added for the selection only) or None.
        config: the layer's routing.
    Returns:
        (weights float32 [N, top_k], ids int64 [N, top_k]), ids in descending order of choice.
    """
    num_tokens, num_experts = logits.shape
    grouping = _grouping(num_experts, config)
    if (grouping is None or logits.dtype != torch.float32 or num_tokens == 0
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (num_experts,)))):
        return route_experts(logits, bias, config)
    groups, group_size = grouping
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty((num_tokens, config.top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, config.top_k), dtype=torch.int64, device=logits.device)
    bias_arg = bias.contiguous() if bias is not None else logits
    _route_kernel[(num_tokens,)](
        logits, bias_arg, weights, ids, logits.stride(0), float(config.scaling),
        NUM_EXPERTS=num_experts, NUM_GROUPS=groups, GROUP_SIZE=group_size, TOPK_GROUPS=config.topk_groups,
        TOP_K=config.top_k, SIGMOID=config.scoring == "sigmoid", GROUP_TOP2=config.method == "noaux_tc",
        HAS_BIAS=bias is not None,
        NORMALIZE=config.normalize and (config.top_k > 1 or config.scoring == "sigmoid"),
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_S=triton.next_power_of_2(group_size),
        BLOCK_K=triton.next_power_of_2(config.top_k), num_warps=4 if num_experts > 256 else 2)
    return weights, ids
