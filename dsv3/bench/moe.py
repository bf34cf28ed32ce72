"""`dsv3 bench moe`: one DeepSeek-V3 MoE layer's routed experts (256 experts, top-8, hidden 7168,
expert intermediate 2048) at decode batches and a 4096-token prefill; and at the prefill, one rank of
expert parallelism over EP_RANKS ranks (its 32 experts), the pairs of the other ranks' experts marked -1
(skipped by the op) beside the same pairs sent to local expert 0 with weight 0 (what it runs without the
skip: every pair's rows).

Bytes counted: the weights of the experts the batch uses (each read once), the activations in
and the output. Peers: the reference backend (batch 1 only: it loops over experts and K blocks),
and at prefill a torch loop of torch._scaled_mm block-wise GEMMs per expert whose token grouping
is done before the timing (which favours it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.backends import fp8
from dsv3.backends.interface import Backend
from dsv3.bench.common import Record, column_major, run_case, scaled_mm_blockwise

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 256, 8, 7168, 2048
DECODE_BATCHES: tuple[int, ...] = (1, 16, 64, 128)
PREFILL_TOKENS: tuple[int, ...] = (4096,)
ROUTINGS = 3  # distinct routings rotated through
EP_RANKS = 8  # the expert-parallel case: one rank of this many, holding experts [0, NUM_EXPERTS / EP_RANKS)


def random_fp8_bytes(shape: tuple[int, ...], device, generator) -> torch.Tensor:
    """Random e4m3fn values from random bytes (no float temporary; the NaN patterns are replaced)."""
    bits = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)
    bits[(bits & 0x7F) == 0x7F] = 0x3C
    return bits.view(torch.float8_e4m3fn)


def make_routing(tokens: int, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-8 distinct experts per token, uniformly at random, and weights summing to 2.5."""
    ids = torch.rand(tokens, NUM_EXPERTS, device=device, generator=generator).topk(TOP_K, dim=-1).indices
    weights = torch.rand(tokens, TOP_K, device=device, generator=generator) + 0.1
    return weights / weights.sum(-1, keepdim=True) * 2.5, ids


def expert_bytes(ids: torch.Tensor, weight_bytes_per_expert: int) -> int:
    return int((ids.unique() >= 0).sum()) * weight_bytes_per_expert


def rank_view(weights: torch.Tensor, ids: torch.Tensor, local: int, skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert-parallel rank's routing (it holds experts [0, local)): the other pairs marked -1 (skip),
    or sent to expert 0 with weight 0."""
    mine = ids < local
    if skip:
        return weights, torch.where(mine, ids, -1)
    return weights.masked_fill(~mine, 0), torch.where(mine, ids, 0)


class ScaledMMLoop:
    """The peer: per expert, torch._scaled_mm for gate+up, SwiGLU, quantize, torch._scaled_mm for down.

    The tokens of each expert are gathered before the timing, padded to 16 rows (the rows
    _scaled_mm takes at least), so the timed part is the per-expert GEMMs and the combine.
    """

    def __init__(self, x, weights, ids, gate_up, gate_up_scale, down, down_scale):
        self.gate_up, self.gate_up_scale, self.down, self.down_scale = gate_up, gate_up_scale, down, down_scale
        self.groups = []
        flat = ids.flatten()
        for expert in flat.unique().tolist():
            pairs = (flat == expert).nonzero()[:, 0]
            rows = max(16, -(-pairs.numel() // 16) * 16)
            pairs = F.pad(pairs, (0, rows - pairs.numel()), value=int(pairs[0]))
            qa, sa = fp8.quantize_activation(x[pairs // TOP_K])
            self.groups.append((expert, pairs, qa, column_major(sa), weights.flatten()[pairs]))
        self.out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def __call__(self):
        self.out.zero_()
        for expert, pairs, qa, sa, w in self.groups:
            gate_up = scaled_mm_blockwise(qa, sa, self.gate_up[expert], self.gate_up_scale[expert])
            hidden = F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:]
            qh, sh = fp8.quantize_activation(hidden)
            y = scaled_mm_blockwise(qh, column_major(sh), self.down[expert], self.down_scale[expert])
            self.out.index_add_(0, pairs // TOP_K, y.float() * w[:, None])
        return self.out


def run(backend: Backend, quick: bool = False, reference: bool = True) -> list[Record]:
    """Time the routed experts at decode batches and prefill; returns the records."""
    device = backend.device
    g = torch.Generator(device).manual_seed(0)
    has_fp8 = backend.capabilities.has_fp8
    gate_up = random_fp8_bytes((NUM_EXPERTS, 2 * INTER, HIDDEN), device, g)
    down = random_fp8_bytes((NUM_EXPERTS, HIDDEN, INTER), device, g)
    gate_up_scale = torch.rand(NUM_EXPERTS, 2 * INTER // 128, HIDDEN // 128, device=device, generator=g) * 2e-3 + 1e-3
    down_scale = torch.rand(NUM_EXPERTS, HIDDEN // 128, INTER // 128, device=device, generator=g) * 2e-3 + 1e-3
    precision = "fp8" if has_fp8 else "bf16"
    experts = backend.prepare_experts(gate_up, gate_up_scale, down, down_scale, precision)
    per_expert = 3 * INTER * HIDDEN * (1 if has_fp8 else 2)
    ref = ref_experts = None
    if reference:
        from dsv3.backends.reference import ReferenceBackend

        ref = ReferenceBackend(device)
        ref_experts = ref.prepare_experts(gate_up, gate_up_scale, down, down_scale, "fp8")
    records: list[Record] = []
    token_counts = (1, 128, 4096) if quick else DECODE_BATCHES + PREFILL_TOKENS
    name = backend.capabilities.name
    for tokens in token_counts:
        case = f"tokens={tokens} E={NUM_EXPERTS} top{TOP_K}"
        routings = [make_routing(tokens, device, g) for _ in range(ROUTINGS)]
        xs = [torch.randn(tokens, HIDDEN, device=device, generator=g, dtype=torch.bfloat16) for _ in routings]
        inputs = [(x, w, i, experts) for x, (w, i) in zip(xs, routings)]
        flops = 6.0 * tokens * TOP_K * HIDDEN * INTER
        moved = expert_bytes(routings[0][1], per_expert) + 4.0 * tokens * HIDDEN
        compute = "fp8_blockwise" if has_fp8 else "bf16"
        run_case(records, "moe", case, f"dsv3 {name} grouped moe ({precision})", backend.moe_experts, inputs, backend,
                 flops, moved, compute, ours=True)
        if ref is not None and tokens == 1:
            run_case(records, "moe", case, "reference backend (torch loop, emulated fp8)", ref.moe_experts,
                     [(x, w, i, ref_experts) for x, (w, i) in zip(xs, routings)], backend, flops, moved, compute,
                     graph=False, target_ms=20)
        if has_fp8 and tokens >= 1024:
            loop = ScaledMMLoop(xs[0], routings[0][0], routings[0][1], gate_up, gate_up_scale, down, down_scale)
            run_case(records, "moe", case, "torch._scaled_mm block-wise loop over experts", loop, [()], backend,
                     flops, moved, compute, graph=False, target_ms=30)
            del loop
    del experts, ref_experts
    local = NUM_EXPERTS // EP_RANKS
    rank_experts = backend.prepare_experts(gate_up[:local], gate_up_scale[:local], down[:local], down_scale[:local],
                                           precision)
    for tokens in PREFILL_TOKENS:
        case = f"tokens={tokens} E={NUM_EXPERTS} top{TOP_K}, one EP{EP_RANKS} rank ({local} experts)"
        routings = [make_routing(tokens, device, g) for _ in range(ROUTINGS)]
        xs = [torch.randn(tokens, HIDDEN, device=device, generator=g, dtype=torch.bfloat16) for _ in routings]
        local_pairs = int((routings[0][1] < local).sum())
        flops = 6.0 * local_pairs * HIDDEN * INTER  # the rank's own pairs: the useful work of both rows
        moved = expert_bytes(routings[0][1][routings[0][1] < local], per_expert) + 4.0 * tokens * HIDDEN
        for skip, impl in ((True, "others' pairs -1 (skipped)"), (False, "others' pairs on expert 0, weight 0")):
            inputs = [(x, *rank_view(w, i, local, skip), rank_experts) for x, (w, i) in zip(xs, routings)]
            run_case(records, "moe", case, f"dsv3 {name} grouped moe ({precision}), {impl}", backend.moe_experts,
                     inputs, backend, flops, moved, "fp8_blockwise" if has_fp8 else "bf16", ours=skip)
    del rank_experts
    if has_fp8 and not quick:
        dense = backend.prepare_experts(gate_up, gate_up_scale, down, down_scale, "bf16")
        del gate_up, down
        for tokens in (128, 4096):
            case = f"tokens={tokens} E={NUM_EXPERTS} top{TOP_K} bf16"
            routings = [make_routing(tokens, device, g) for _ in range(ROUTINGS)]
            xs = [torch.randn(tokens, HIDDEN, device=device, generator=g, dtype=torch.bfloat16) for _ in routings]
            run_case(records, "moe", case, f"dsv3 {name} grouped moe (bf16 variant)", backend.moe_experts,
                     [(x, w, i, dense) for x, (w, i) in zip(xs, routings)], backend,
                     6.0 * tokens * TOP_K * HIDDEN * INTER,
                     expert_bytes(routings[0][1], 2 * 3 * INTER * HIDDEN) + 4.0 * tokens * HIDDEN, "bf16", ours=True)
    return records
