"""The conformance cases of the ops that own state or many weights: MLA prefill and decode (on a paged
latent cache the backend allocates, its blocks shuffled over the pool), MoE routing (each DeepSeek
generation's method) and MoE experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dsv3.backends.interface import Backend, MLAInputs
from dsv3.conformance.cases import (
    expert_weights,
    generator,
    poison,
    randn,
    times_1e4,
    v3_rope,
    v3_softmax_scale,
    zero_row,
)
from dsv3.conformance.paged import block_tables, paged_batch
from dsv3.conformance.suite import (
    FP8_CACHE_TOLERANCES,
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


def _prepare(backend: Backend, inp: dict, shared, num_seqs: int):
    """A case's absorbed weights, a fresh cache pool, and per sequence the tokens already in it: the shared
    prefix (shared = (owner, sharer, blocks)) for the sequence that shares it, else 0."""
    weights = backend.prepare_mla(inp["kv_b"], inp["heads"], NOPE, VALUE, inp["dtype"])
    spec = backend.mla_cache_spec(inp["num_blocks"], inp["block_size"], RANK, ROPE, inp["dtype"],
                                  inp.get("kv_cache_dtype", "auto"))
    cached = [shared[2] * inp["block_size"] if shared and seq == shared[1] else 0 for seq in range(num_seqs)]
    return weights, backend.allocate_mla_cache(spec), cached


def _token_inputs(g: torch.Generator, tokens: int, heads: int, dtype: torch.dtype) -> dict:
    shapes = dict(q_nope=(tokens, heads, NOPE), q_pe=(tokens, heads, ROPE), latent=(tokens, RANK), k_pe=(tokens, ROPE))
    return {name: randn(g, *shape).to(dtype) for name, shape in shapes.items()}


def _layout(g: torch.Generator, seq_lens: list[int], block_size: int, shared) -> dict:
    """The block tables (shuffled over the pool, block 0 unused, padded with zeros) of a case."""
    tables, num_blocks = block_tables(seq_lens, block_size, g, shared=shared)
    return dict(tables=tables, num_blocks=num_blocks, block_size=block_size)


def _prefill(backend: Backend, cache, inp: dict, tokens: list[dict], spans: list[tuple[int, int, int]], weights):
    """One mla_prefill call: sequence seq's tokens start .. end - 1 for each (seq, start, end) in spans."""
    rows = {k: torch.cat([tokens[seq][k][start:end] for seq, start, end in spans]) for k in tokens[spans[0][0]]}
    batch = paged_batch(inp["tables"][[seq for seq, _, _ in spans]], [end for _, _, end in spans],
                        [end - start for _, start, end in spans], backend.device)
    return backend.mla_prefill(MLAInputs(**rows), cache, batch, weights, inp["scale"])


def mla_prefill_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, seq_lens, calls, block_size=64, shared=None, nan=False, kv_cache_dtype="auto"):
        """calls: the new tokens of each mla_prefill call, per sequence (0: not in that call).
        kv_cache_dtype "fp8": the FP8 latent cache (the reference backend emulates it exactly)."""
        def inputs(ctx):
            g = generator(f"prefill{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), calls=calls,
                       kv_cache_dtype=kv_cache_dtype,
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       tokens=[_token_inputs(g, n, heads, dtype) for n in seq_lens],
                       **_layout(g, seq_lens, block_size, shared))
            if nan:
                poison(inp["tokens"][0]["latent"], (0,), float("nan"))
                mask = torch.zeros(sum(calls[0]), heads, dtype=torch.bool)
                mask[:calls[0][0]] = True  # every query of sequence 0 attends its token 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            weights, cache, done = _prepare(backend, inp, shared, len(seq_lens))
            outs = []
            for new in inp["calls"]:
                spans = [(seq, done[seq], done[seq] + n) for seq, n in enumerate(new) if n]
                outs.append(_prefill(backend, cache, inp, inp["tokens"], spans, weights))
                done = [d + n for d, n in zip(done, new, strict=True)]
            return tuple(outs) if len(outs) > 1 else outs[0]
        return Case("mla_prefill", precision, name, inputs, call, "propagate" if nan else "close",
                    FP8_CACHE_TOLERANCES[precision] if kv_cache_dtype == "fp8" else None)

    long, large = plan.long_seq, plan.large_batch
    return [
        case("length 1, batch 1", V3_HEADS, [1], [[1]]),
        case("mixed lengths [16, 5, 64, 65] in one batch, blocks of 16 (ends on a block boundary and one past)",
             V3_HEADS, [16, 5, 64, 65], [[16, 5, 64, 65]], block_size=16),
        case("chunked: lengths 48 and 40 in chunks of 24+24 and 17+23 (the second chunks start mid-block)",
             V3_HEADS, [48, 40], [[24, 17], [24, 23]]),
        case("a prefix of two blocks shared: sequence 1 prefills its 12 tokens after sequence 0's 128 cached",
             V3_HEADS, [150, 140], [[150, 0], [0, 12]], shared=(0, 1, 2)),
        case(f"large batch B={large} T=4", V3_HEADS, [4] * large, [[4] * large]),
        case(f"long T={long}, 16 heads (V2-Lite), blocks of 128", LITE_HEADS, [long], [[long]], block_size=128),
        case("NaN in sequence 0's first latent", V3_HEADS, [8, 8], [[8, 8]], nan=True),
        case("FP8 latent cache: lengths [16, 5, 64, 65], blocks of 16", V3_HEADS, [16, 5, 64, 65], [[16, 5, 64, 65]],
             block_size=16, kv_cache_dtype="fp8"),
        case("FP8 latent cache: chunked, lengths 48 and 40 in chunks of 24+24 and 17+23", V3_HEADS, [48, 40],
             [[24, 17], [24, 23]], kv_cache_dtype="fp8"),
        case("FP8 latent cache: a prefix of two blocks shared, sequence 1 prefills 12 tokens after 128 cached",
             V3_HEADS, [150, 140], [[150, 0], [0, 12]], shared=(0, 1, 2), kv_cache_dtype="fp8"),
    ]


def mla_decode_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, heads, history, block_size=64, shared=None, nan=False, rope=False, chunk=1, kv_cache_dtype="auto"):
        """history: cached tokens per sequence before the decoded one (the new token's position).
        chunk: sequence 0 runs this many prompt tokens as decode rows that share its table (shared_rows).
        kv_cache_dtype "fp8": the FP8 latent cache (the reference backend emulates it exactly)."""
        row_seqs = [0] * chunk + list(range(1, len(history)))
        positions = [history[0] + i for i in range(chunk)] + history[1:]
        seq_lens = [history[0] + chunk] + [n + 1 for n in history[1:]]

        def inputs(ctx):
            g = generator(f"decode{precision}{name}")
            inp = dict(heads=heads, dtype=dtype, scale=v3_softmax_scale(ctx), history=history,
                       kv_cache_dtype=kv_cache_dtype,
                       rope=[t[:, 0] for t in v3_rope(ctx, torch.tensor(positions)[:, None])] if rope else None,
                       kv_b=randn(g, heads * (NOPE + VALUE), RANK, scale=RANK ** -0.5),
                       tokens=[_token_inputs(g, n, heads, dtype) for n in history],
                       new=_token_inputs(g, len(positions), heads, dtype), **_layout(g, seq_lens, block_size, shared))
            if nan:
                poison(inp["new"]["q_nope"], (0, 0), float("nan"))
                mask = torch.zeros(len(history), heads, dtype=torch.bool)
                mask[0, 0] = True  # heads are independent: only head 0 of sequence 0
                inp["poisoned"] = mask
            return inp

        def call(backend, inp):
            # the history through the backend's own mla_prefill, in chunks of PREFILL_CHUNK, sequences batched; a
            # sequence that shares another's blocks writes only its own tokens, after the other's
            weights, cache, first = _prepare(backend, inp, shared, len(history))
            for phase in sorted({f > 0 for f in first}):
                for start in range(0, max(history), PREFILL_CHUNK):
                    spans = [(seq, max(first[seq], start), min(n, start + PREFILL_CHUNK))
                             for seq, n in enumerate(history) if (first[seq] > 0) == phase]
                    spans = [span for span in spans if span[1] < span[2]]
                    if spans:
                        _prefill(backend, cache, inp, inp["tokens"], spans, weights)
            batch = paged_batch(inp["tables"][row_seqs], [p + 1 for p in positions], [1] * len(positions),
                                backend.device)
            batch = replace(batch, shared_rows=chunk > 1)
            return backend.mla_decode(MLAInputs(**inp["new"]), cache, batch, weights, inp["scale"], rope=inp["rope"])
        return Case("mla_decode", precision, name, inputs, call, "propagate" if nan else "close",
                    FP8_CACHE_TOLERANCES[precision] if kv_cache_dtype == "fp8" else None)

    long, large = plan.long_seq, plan.large_batch
    return [
        case("batch 1 at position 0 (no history)", V3_HEADS, [0]),
        case("B=5 at positions [5, 17, 1, 64, 63], blocks of 16 (lengths 65 one past a block boundary, 64 on one)",
             V3_HEADS, [5, 17, 1, 64, 63], block_size=16),
        case("B=5 at positions [5, 17, 1, 64, 63], blocks of 16, rope in the op (unrotated q_pe, k_pe and YaRN "
             "cos/sin)", V3_HEADS, [5, 17, 1, 64, 63], block_size=16, rope=True),
        case("two sequences sharing a prefix of two blocks of 16, at positions 70 and 40", V3_HEADS, [70, 40],
             block_size=16, shared=(0, 1, 2)),
        case("a prompt chunk of 21 tokens as decode rows (shared_rows) after 70 cached, beside decodes at 5 and 16, "
             "blocks of 16, rope in the op", V3_HEADS, [70, 5, 16], block_size=16, rope=True, chunk=21),
        case(f"large batch B={large} at positions 1, 9, 33, 64", V3_HEADS,
             [(1, 9, 33, 64)[i % 4] for i in range(large)]),
        case(f"long context {long} and {long // 2 + 3}, 16 heads, blocks of 128", LITE_HEADS,
             [long - 1, long // 2 + 2], block_size=128),
        case("NaN in sequence 0's query, head 0", V3_HEADS, [3, 9], nan=True),
        case("FP8 latent cache: B=5 at positions [5, 17, 1, 64, 63], blocks of 16 (shuffled, on and one past a "
             "block boundary)", V3_HEADS, [5, 17, 1, 64, 63], block_size=16, kv_cache_dtype="fp8"),
        case("FP8 latent cache: two sequences sharing a prefix of two blocks of 16, at positions 70 and 40, rope in "
             "the op", V3_HEADS, [70, 40], block_size=16, shared=(0, 1, 2), rope=True, kv_cache_dtype="fp8"),
        case("FP8 latent cache: a prompt chunk of 21 tokens as decode rows (shared_rows) after 70 cached, beside "
             "decodes at 5 and 16, blocks of 16", V3_HEADS, [70, 5, 16], block_size=16, chunk=21,
             kv_cache_dtype="fp8"),
        case(f"FP8 latent cache: long context {long}, 16 heads, blocks of 128", LITE_HEADS, [long - 1],
             block_size=128, kv_cache_dtype="fp8"),
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

    def skip_most(ids, g, num_experts, top_k):  # 3 in 4 pairs marked -1 (another rank's): token 0 all, token 1 none
        skipped = torch.rand(ids.shape, generator=g) < 0.75
        skipped[0], skipped[1] = True, False
        return ids.masked_fill(skipped, -1)

    def nan_skipped_weights(inp):  # a skipped pair's weight is ignored: NaN there must not reach the output
        inp["weights"] = inp["weights"].masked_fill(inp["ids"] < 0, float("nan"))

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
        case("pairs marked -1 skipped (NaN weights), N=16", main, 16, choose=skip_most,
             transform=nan_skipped_weights),
        case(f"pairs marked -1 skipped (NaN weights), N={plan.large_tokens}", main, plan.large_tokens,
             choose=skip_most, transform=nan_skipped_weights),
        case("NaN and inf tokens sharing an expert", main, 8, choose=one_expert_everywhere, transform=non_finite,
             check="propagate"),
    ]
    if precision == "fp8":
        cases.append(case("activations beyond FP8 range (x1e4)", main, 4, transform=times_1e4))
    if extra and precision != "fp32":
        cases.append(case("N=4", extra, 4))
    return cases
