"""The conformance cases of the ops that own state or many weights: MLA prefill and decode (on a
latent cache the backend allocates), MoE routing (each DeepSeek generation's method) and MoE experts.
"""

from __future__ import annotations

import torch

from dsv3.backends.interface import Backend
from dsv3.conformance.cases import expert_weights, generator, poison, randn, v3_rope, v3_softmax_scale
from dsv3.conformance.suite import (
    LITE_HEADS,
    NOPE,
    PREFILL_CHUNK,
    RANK,
    ROPE,
    ROUTINGS,
    V3_HEADS,
    VALUE,
    Case,
    Plan,
)
from dsv3.model import ACTIVATION_DTYPES


def _mla_weights(backend: Backend, inp: dict):
    heads = inp["heads"]
    return backend.prepare_mla(inp["kv_b"], heads, NOPE, VALUE, inp["dtype"])


def _mla_cache(backend: Backend, inp: dict, max_batch: int, max_seq: int) -> torch.Tensor:
    return backend.allocate_mla_cache(backend.mla_cache_spec(max_batch, max_seq, RANK, ROPE, inp["dtype"]))


def _attention_inputs(g: torch.Generator, batch: int, tokens: int, heads: int, dtype: torch.dtype) -> dict:
    shapes = dict(q_nope=(batch, tokens, heads, NOPE), q_pe=(batch, tokens, heads, ROPE),
                  latent=(batch, tokens, RANK), k_pe=(batch, tokens, ROPE))
    return {name: randn(g, *shape).to(dtype) for name, shape in shapes.items()}


def _prefill(backend, cache, slots, start_pos, part, weights, scale):
    return backend.mla_prefill(part["q_nope"], part["q_pe"], part["latent"], part["k_pe"], cache, slots,
                               start_pos, weights, scale)


def mla_prefill_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, batch, tokens, slots, chunks=1, nan=False):
        def inputs(ctx):
            g = generator(f"prefill{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), slots=torch.tensor(slots),
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       parts=[_attention_inputs(g, batch, tokens, heads, dtype) for _ in range(chunks)])
            if nan:
                poison(inp["parts"][0]["latent"], (0, 0), float("nan"))
                mask = torch.zeros(batch, tokens, heads, dtype=torch.bool)
                mask[0] = True  # every query of sequence 0 attends token 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            weights = _mla_weights(backend, inp)
            cache = _mla_cache(backend, inp, max(slots) + 1, tokens * chunks)
            outs = tuple(_prefill(backend, cache, inp["slots"], i * tokens, part, weights, inp["scale"])
                         for i, part in enumerate(inp["parts"]))
            return outs if len(outs) > 1 else outs[0]
        return Case("mla_prefill", precision, name, inputs, call, "propagate" if nan else "close")

    long, large = plan.long_seq, plan.large_batch
    return [
        case("length 1, batch 1", V3_HEADS, 1, 1, [0]),
        case("B=2 T=16, slots [3, 1]", V3_HEADS, 2, 16, [3, 1]),
        case("chunked: T=24 at start_pos 0 then 24", V3_HEADS, 2, 24, [0, 1], chunks=2),
        case(f"large batch B={large} T=4", V3_HEADS, large, 4, list(range(large))),
        case(f"long T={long}, 16 heads (V2-Lite)", LITE_HEADS, 1, long, [0]),
        case("NaN in sequence 0's first latent", V3_HEADS, 2, 8, [0, 1], nan=True),
    ]


def mla_decode_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, lengths, nan=False, rope=False):
        def inputs(ctx):
            g = generator(f"decode{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), lengths=lengths,
                       rope=[t[:, 0] for t in v3_rope(ctx, torch.tensor(lengths)[:, None])] if rope else None,
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       history=[_attention_inputs(g, 1, n, heads, dtype) if n else None for n in lengths],
                       new={k: v[:, 0] for k, v in _attention_inputs(g, len(lengths), 1, heads, dtype).items()})
            if nan:
                poison(inp["new"]["q_nope"], (0, 0), float("nan"))
                mask = torch.zeros(len(lengths), heads, dtype=torch.bool)
                mask[0, 0] = True  # heads are independent: only head 0 of sequence 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            weights = _mla_weights(backend, inp)
            device = backend.device
            cache = _mla_cache(backend, inp, len(lengths), max(lengths) + 1)
            for n in sorted(set(lengths) - {0}):  # one prefill per history length, sequences batched
                slots = [i for i, length in enumerate(lengths) if length == n]
                history = {k: torch.cat([inp["history"][i][k] for i in slots]) for k in inp["history"][slots[0]]}
                for start in range(0, n, PREFILL_CHUNK):
                    chunk = {k: v[:, start:start + PREFILL_CHUNK] for k, v in history.items()}
                    _prefill(backend, cache, torch.tensor(slots, device=device), start, chunk, weights, inp["scale"])
            new = inp["new"]
            return backend.mla_decode(new["q_nope"], new["q_pe"], new["latent"], new["k_pe"], cache,
                                      torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device), weights, inp["scale"], rope=inp["rope"])
        return Case("mla_decode", precision, name, inputs, call, "propagate" if nan else "close")

    long, large = plan.long_seq, plan.large_batch
    return [
        case("batch 1 at position 0 (no history)", V3_HEADS, [0]),
        case("B=4 at positions [5, 17, 1, 64]", V3_HEADS, [5, 17, 1, 64]),
        case("B=4 at positions [5, 17, 1, 64], rope in the op (unrotated q_pe, k_pe and YaRN cos/sin)", V3_HEADS,
             [5, 17, 1, 64], rope=True),
        case(f"large batch B={large} at positions 1, 9, 33, 64", V3_HEADS,
             [(1, 9, 33, 64)[i % 4] for i in range(large)]),
        case(f"long context {long} and {long // 2 + 3}, 16 heads", LITE_HEADS, [long, long // 2 + 3]),
        case("NaN in sequence 0's query, head 0", V3_HEADS, [3, 9], nan=True),
    ]


def moe_route_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(method, name, tokens, with_bias=True, nan=False):
        hidden, experts, config = ROUTINGS[method]

        def inputs(ctx):
            g = generator(f"route{method}{name}")
            # logits ~ N(0, 1): sigmoid scores stay off saturation, so few tokens are near-ties
            inp = dict(x=randn(g, tokens, hidden), gate_weight=randn(g, experts, hidden, scale=hidden ** -0.5),
                       bias=randn(g, experts, scale=0.1) if with_bias and method == "noaux_tc" else None,
                       config=config)
            if nan:
                poison(inp["x"], (3,), float("nan"))
                inp["poisoned"] = torch.arange(tokens) == 3
            inp["x"] = inp["x"].to(dtype)
            return inp
        return Case("moe_route", precision, f"{method}: {name}", inputs,
                    lambda backend, inp: backend.moe_route(inp["x"], inp["gate_weight"], inp["bias"], inp["config"]),
                    "route")

    cases = []
    for method in ROUTINGS:
        cases += [case(method, f"N={n}", n) for n in plan.token_counts]
        cases += [case(method, f"large batch N={plan.large_tokens}", plan.large_tokens),
                  case(method, "NaN token 3 of 8 (other tokens unaffected)", 8, nan=True)]
    cases.append(case("noaux_tc", "no correction bias N=16", 16, with_bias=False))
    return cases


def moe_experts_cases(plan: Plan, precision: str) -> list[Case]:
    """The plan's expert shape for every case; its extra shape for one case at fp8 and bf16."""
    dtype = ACTIVATION_DTYPES[precision]
    main, extra = plan.experts, plan.extra_experts

    def case(name, shape, tokens, choose=None, transform=None, check="close"):
        num_experts, hidden, inter, fp8_checkpoint, top_k = shape

        def inputs(ctx):
            g = generator(f"experts{precision}{name}{shape}")
            ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
            if choose:
                ids = choose(ids, g, num_experts, top_k)
            inp = dict(x=randn(g, tokens, hidden), ids=ids, weights=torch.rand(tokens, top_k, generator=g) + 0.1,
                       **expert_weights(ctx, num_experts, hidden, inter, fp8_checkpoint))
            if transform:
                transform(inp)
            inp["x"] = inp["x"].to(dtype)
            return inp

        def call(backend, inp):
            experts = backend.prepare_experts(inp["gate_up"], inp["gate_up_scale"], inp["down"], inp["down_scale"],
                                              precision)
            return backend.moe_experts(inp["x"], inp["weights"], inp["ids"], experts)
        label = f"{name} [{num_experts} experts D={hidden} I={inter}, top-{top_k}]"
        return Case("moe_experts", precision, label, inputs, call, check)

    def few_experts(ids, g, num_experts, top_k):  # only experts 0..top_k-1 get tokens: the rest get none
        return torch.stack([torch.randperm(top_k, generator=g) for _ in range(ids.shape[0])])

    def one_expert_everywhere(ids, g, num_experts, top_k):  # expert 2 gets every token
        rows = []
        for _ in range(ids.shape[0]):
            others = torch.randperm(num_experts - 1, generator=g)[:top_k - 1]
            rows.append(torch.cat((torch.tensor([2]), others + (others >= 2).long())))
        return torch.stack(rows)

    def zero_row(inp):
        inp["x"][1] = 0

    def beyond_range(inp):
        inp["x"] *= 1e4

    def non_finite(inp):
        poison(inp["x"], (1,), float("nan"))
        poison(inp["x"], (4,), float("inf"), 9)
        inp["poisoned"] = torch.isin(torch.arange(inp["x"].shape[0]), torch.tensor([1, 4]))

    cases = [case(f"N={n}", main, n) for n in plan.token_counts]
    cases += [
        case(f"large batch N={plan.large_tokens}", main, plan.large_tokens),
        case("experts with no tokens", main, 16, choose=few_experts),
        case(f"one expert with all {plan.large_tokens} tokens", main, plan.large_tokens, choose=one_expert_everywhere),
        case("zero token row", main, 4, transform=zero_row),
        case("NaN and inf tokens sharing an expert", main, 8, choose=one_expert_everywhere, transform=non_finite,
             check="propagate"),
    ]
    if precision == "fp8":
        cases.append(case("activations beyond FP8 range (x1e4)", main, 4, transform=beyond_range))
    if extra and precision != "fp32":
        cases.append(case("N=4", extra, 4))
    return cases
