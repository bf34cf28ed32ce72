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

`gate_route` adds the gate GEMV for a few tokens (decode) to the same launch: programs of a few
experts compute a token's logits, and the one that finishes the token's last block routes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dsv3.backends.interface import RoutingConfig
from dsv3.backends.reference import route_experts

MAX_LANES = 1024  # padded experts one program holds; beyond it, the reference path


@triton.jit
def _route_row(logits_row, bias_ptr, weights_row, ids_row, scaling,
               NUM_EXPERTS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr,
               GROUP_TOP2: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
               BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Route one token from its logits row (read from L2: another program may have written it)."""
    group = tl.arange(0, BLOCK_G)[:, None]
    slot = tl.arange(0, BLOCK_S)[None, :]
    valid = (group < NUM_GROUPS) & (slot < GROUP_SIZE)
    expert = tl.where(valid, group * GROUP_SIZE + slot, NUM_EXPERTS)  # NUM_EXPERTS marks a padding lane

    logits = tl.load(logits_row + expert, mask=valid, other=float("-inf"), cache_modifier=".cg")
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
    tl.store(weights_row + out, weights * scaling, mask=out < TOP_K)
    tl.store(ids_row + out, ids, mask=out < TOP_K)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_logits, scaling,
                  NUM_EXPERTS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                  TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr,
                  GROUP_TOP2: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    _route_row(logits_ptr + token * stride_logits, bias_ptr, weights_ptr + token * TOP_K, ids_ptr + token * TOP_K,
               scaling, NUM_EXPERTS, NUM_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP_K, SIGMOID, GROUP_TOP2, HAS_BIAS,
               NORMALIZE, BLOCK_G, BLOCK_S, BLOCK_K)


@triton.jit
def _gate_route_kernel(x_ptr, gate_ptr, bias_ptr, logits_ptr, counter_ptr, weights_ptr, ids_ptr, hidden,
                       stride_x, stride_gate, scaling, num_parts,
                       NUM_EXPERTS: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       TOPK_GROUPS: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr,
                       GROUP_TOP2: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (block of experts, token): the token's fp32 gate logits of BLOCK_E experts; the program that
    draws the token's last ticket routes it and sets the ticket counter back to zero."""
    part = tl.program_id(0)
    token = tl.program_id(1).to(tl.int64)
    experts = part * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < NUM_EXPERTS
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    for start in range(0, hidden, BLOCK_D):
        col_ok = start + cols < hidden
        x = tl.load(x_ptr + token * stride_x + start + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(gate_ptr + experts[:, None].to(tl.int64) * stride_gate + start + cols[None, :],
                    mask=expert_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w * x[None, :]
    logits_row = logits_ptr + token * NUM_EXPERTS
    tl.store(logits_row + experts, tl.sum(acc, axis=1), mask=expert_ok)
    tl.debug_barrier()  # every thread's logits stored before the ticket, whose release publishes them
    ticket = tl.atomic_add(counter_ptr + token, 1, sem="acq_rel")
    if ticket == num_parts - 1:
        _route_row(logits_row, bias_ptr, weights_ptr + token * TOP_K, ids_ptr + token * TOP_K, scaling,
                   NUM_EXPERTS, NUM_GROUPS, GROUP_SIZE, TOPK_GROUPS, TOP_K, SIGMOID, GROUP_TOP2, HAS_BIAS,
                   NORMALIZE, BLOCK_G, BLOCK_S, BLOCK_K)
        tl.store(counter_ptr + token, 0)


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


def _constants(num_experts: int, grouping: tuple[int, int], has_bias: bool, config: RoutingConfig) -> dict:
    groups, group_size = grouping
    return dict(NUM_EXPERTS=num_experts, NUM_GROUPS=groups, GROUP_SIZE=group_size, TOPK_GROUPS=config.topk_groups,
                TOP_K=config.top_k, SIGMOID=config.scoring == "sigmoid", GROUP_TOP2=config.method == "noaux_tc",
                HAS_BIAS=has_bias, NORMALIZE=config.normalize and (config.top_k > 1 or config.scoring == "sigmoid"),
                BLOCK_G=triton.next_power_of_2(groups), BLOCK_S=triton.next_power_of_2(group_size),
                BLOCK_K=triton.next_power_of_2(config.top_k))


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
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    weights = torch.empty((num_tokens, config.top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, config.top_k), dtype=torch.int64, device=logits.device)
    bias_arg = bias.contiguous() if bias is not None else logits
    _route_kernel[(num_tokens,)](
        logits, bias_arg, weights, ids, logits.stride(0), float(config.scaling),
        **_constants(num_experts, grouping, bias is not None, config), num_warps=4 if num_experts > 256 else 2)
    return weights, ids


#: the most tokens gate_route computes the gate logits for itself (each re-reads the gate weight, from L2)
GATE_MAX_TOKENS = 16
#: experts per program of the gate GEMV: enough programs to spread the weight over the SMs
GATE_BLOCK_E = 2

_ticket_counters: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device) -> torch.Tensor:
    """Per-token ticket counters, int32 zeros that every gate_route call leaves zeroed (one per device,
    allocated at the first call, outside any graph capture: the backend's warm-up runs come first)."""
    if device not in _ticket_counters:
        _ticket_counters[device] = torch.zeros(GATE_MAX_TOKENS, dtype=torch.int32, device=device)
    return _ticket_counters[device]


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None,
               config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits = x @ gate_weight^T in float32, then `route`, in one launch for a few tokens.

    At decode the router is a GEMV of a few tokens: a cast of x, a BLAS GEMV (often with a reduction
    kernel of its own) and the routing kernel are three or four launches for microseconds of work.
    Here programs of GATE_BLOCK_E experts each compute their logits of one token in float32 (x upcast,
    as F.linear(x.float(), gate_weight) computes them, in another summation order), and the program
    that finishes a token's last block routes it. More than GATE_MAX_TOKENS tokens, and what `route`
    leaves to the reference, take F.linear and `route`.

    Args:
        x: [N, D] activations (bf16, fp16 or fp32), unit stride along D.
        gate_weight: float32 [E, D]; bias: float32 [E] or None.
        config: the layer's routing.
    Returns:
        (weights float32 [N, top_k], ids int64 [N, top_k]), as `route`.
    """
    num_tokens, hidden = x.shape
    num_experts = gate_weight.shape[0]
    grouping = _grouping(num_experts, config)
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if (grouping is None or not 0 < num_tokens <= GATE_MAX_TOKENS or gate_weight.dtype != torch.float32
            or (capturing and x.device not in _ticket_counters)
            or x.stride(1) != 1 or gate_weight.stride(1) != 1
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (num_experts,)))):
        return route(F.linear(x.float(), gate_weight.float()), bias, config)
    device = x.device
    logits = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=device)
    weights = torch.empty((num_tokens, config.top_k), dtype=torch.float32, device=device)
    ids = torch.empty((num_tokens, config.top_k), dtype=torch.int64, device=device)
    parts = triton.cdiv(num_experts, GATE_BLOCK_E)
    _gate_route_kernel[(parts, num_tokens)](
        x, gate_weight, bias.contiguous() if bias is not None else gate_weight, logits, _tickets(device), weights,
        ids, hidden, x.stride(0), gate_weight.stride(0), float(config.scaling), parts,
        **_constants(num_experts, grouping, bias is not None, config), BLOCK_E=GATE_BLOCK_E,
        BLOCK_D=min(1024, triton.next_power_of_2(hidden)), num_warps=4)
    return weights, ids
