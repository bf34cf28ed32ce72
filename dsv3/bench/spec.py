"""`dsv3 bench spec`: what MTP speculative decoding costs and gains, beside the plain decode step in the same run.

1. Steps at DeepSeek-V3's layer dimensions (`--config`, synthetic weights made on the device, its MTP module
   included; `--layers N` or as many as fit), every sequence with `--context` tokens cached (random latents):
   - the plain decode step at each batch (one token per sequence), and the verify step for k = 1, 2, 3
     (1 + k query tokens per sequence, as the engine runs it: chunk rows through the paged MLA decode path,
     every row's hidden state and logits kept), both replayed from a recording where the backend makes one;
   - the draft step as the engine runs it: the MTP module over 1 + k positions per sequence (its cache fill,
     the most a step can accept), its head, and k - 1 recurrent one-token passes with their heads; replayed
     from the engine's recording (dsv3/serving/draft_recording.py, host side included) where the backend
     records steps, else eager.
   Each step is timed with no layer, with the dense layers only and with all of them, so the full model's
   step is projected as base + 3 dense + 58 MoE layers (V3's 61); the verify step is printed as a multiple
   of the plain one, and the projected speed-up at batch b is (1 + a + ... + a^k) x plain / (verify + draft)
   at DeepSeek's published acceptance a (--acceptance, default 0.85 of the first draft token; later ones
   assumed to be accepted at the same rate, which the recurrent use of the module does not promise).
   Speculation stops paying at the first batch whose best projected speed-up is below 1.
2. End to end on the built-in tiny checkpoint at batch 1: its own greedy text through the engine with and
   without speculation (k = 1, 2, 3), its real acceptance, output tokens per second and the speed-up.
"""

from __future__ import annotations

import contextlib
import time

import torch

from dsv3.backends.interface import Backend, PagedBatch
from dsv3.bench.common import error_line, time_op
from dsv3.bench.harness import BLOCK_SIZE, bench_config, fill_caches, fit_layers, free_memory
from dsv3.checkpoint import RandomSource, WeightLoader
from dsv3.config import load_config
from dsv3.model import ForwardBatch, Transformer
from dsv3.serving.draft_recording import DraftRecordings

V3_LAYERS, V3_DENSE = 61, 3
KS = (1, 2, 3)
TINY_PROMPTS = ("A mixture of experts", "The", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend chips", "Once upon a time")


def _build(config, backend: Backend, precision: str, num_blocks: int, max_seq: int) -> tuple[Transformer, torch.Tensor]:
    """The model with synthetic weights and its MTP module, caches allocated and filled; and the MTP's pool."""
    source = RandomSource(config, fp8=precision == "fp8", seed=0, device=backend.device, fast=True)
    loader = WeightLoader(source, config, include_mtp=True, progress=False)
    try:
        model = Transformer(config, backend, loader, precision, max_seq, load_mtp=True)
    finally:
        loader.close()
    model.allocate_cache(num_blocks, BLOCK_SIZE)
    fill_caches(model)
    mtp_cache = backend.allocate_mla_cache(model.cache_spec_for(num_blocks, BLOCK_SIZE))
    mtp_cache.normal_(generator=torch.Generator(backend.device).manual_seed(1))
    return model, mtp_cache


def _rows_batch(batch: int, rows: int, context: int, device, shared: bool, vocab_size: int) -> ForwardBatch:
    """`batch` sequences of `context` cached tokens, each running `rows` tokens as decode rows (chunk rows
    attending to the rows before them where rows > 1), each sequence in its own blocks."""
    per_seq = -(-(context + rows) // BLOCK_SIZE)
    tables = 1 + torch.arange(batch * per_seq, dtype=torch.int32, device=device).view(batch, per_seq)
    offsets = torch.arange(rows, device=device).repeat(batch)
    positions = context + offsets
    g = torch.Generator(device).manual_seed(2)
    tokens = torch.randint(0, vocab_size, (batch * rows,), device=device, generator=g)
    paged = PagedBatch(block_tables=tables.repeat_interleave(rows, dim=0),
                       seq_lens=(positions + 1).to(torch.int32),
                       query_start=torch.arange(batch * rows + 1, dtype=torch.int32, device=device),
                       max_query_len=1, max_seq_len=context + rows, shared_rows=shared)
    return ForwardBatch(tokens, positions, batch * rows, paged, None)


@contextlib.contextmanager
def _layers(model: Transformer, count: int):
    """The model with only its first `count` layers (and their caches)."""
    layers, caches = model.layers, model.caches
    model.layers, model.caches = layers[:count], caches[:count]
    try:
        yield
    finally:
        model.layers, model.caches = layers, caches


def _step_ms(model: Transformer, batch: ForwardBatch, keep_hidden: bool, quick: bool) -> tuple[float, bool]:
    """The engine's recorded step on `batch`: every row's logits (and hidden state, for the proposer); its
    median ms and whether the backend recorded it."""
    rows = batch.num_tokens
    hidden = torch.empty(rows, model.config.hidden_size, dtype=model.dtype, device=batch.tokens.device)
    logits = torch.empty(rows, model.config.vocab_size, dtype=torch.float32, device=batch.tokens.device)

    def step():
        if keep_hidden:
            hidden.copy_(model.hidden(batch))
            logits.copy_(model.project(hidden))
        else:
            logits.copy_(model.forward(batch))

    with torch.inference_mode():
        timing = time_op(step, [()], model.backend, graph=True, target_ms=40.0 if quick else 200.0,
                         min_reps=2 if quick else 5, max_reps=50, warmup=1 if quick else 2)
    return timing.median_ms, timing.mode == "graph"


def _draft_ms(model: Transformer, mtp_cache: torch.Tensor, batch: int, k: int, context: int, quick: bool,
              rows: bool) -> tuple[float, bool]:
    """The proposer's work for `batch` sequences that accepted everything, as the engine runs it, and whether
    it was recorded: where the backend records steps (`rows`), the recorded draft step with its host side
    (buffers written, replay, the drafts read back); else (or where the backend declines it) eagerly, its
    cache fill as prefill chunks."""
    if rows:
        recorded = _recorded_draft_ms(model, mtp_cache, batch, k, context, quick)
        if recorded is not None:
            return recorded, True
    device, module = model.backend.device, model.mtp[0]
    fill = _rows_batch(batch, k + 1, context, device, shared=False, vocab_size=model.config.vocab_size)
    fill = ForwardBatch(fill.tokens, fill.positions, 0, None, PagedBatch(
        block_tables=fill.decode.block_tables[::k + 1], seq_lens=fill.decode.seq_lens[k::k + 1],
        query_start=torch.arange(0, batch * (k + 1) + 1, k + 1, dtype=torch.int32, device=device),
        max_query_len=k + 1, max_seq_len=context + k + 1))
    step = _rows_batch(batch, 1, context + k + 1, device, shared=False, vocab_size=model.config.vocab_size)
    hidden = torch.randn(batch * (k + 1), model.config.hidden_size, device=device).to(model.dtype)
    last = torch.arange(k, batch * (k + 1), k + 1, device=device)

    def draft():
        out = module(hidden, fill.tokens, mtp_cache, fill, model.cos[fill.positions], model.sin[fill.positions])
        h = out[last]
        module.project(h).argmax(dim=-1)
        for _ in range(k - 1):
            h = module(h, step.tokens, mtp_cache, step, model.cos[step.positions], model.sin[step.positions])
            module.project(h).argmax(dim=-1)

    with torch.inference_mode():
        return time_op(draft, [()], model.backend, graph=False, target_ms=40.0 if quick else 200.0,
                       min_reps=2 if quick else 5, max_reps=50, warmup=1 if quick else 2).median_ms, False


def _recorded_draft_ms(model: Transformer, mtp_cache: torch.Tensor, batch: int, k: int, context: int,
                       quick: bool) -> float | None:
    """The engine's recorded draft step (DraftRecordings.run) for `batch` sequences of 1 + k fill rows each;
    None where the backend declines to record it."""
    device, rows = model.backend.device, k + 1
    fill = _rows_batch(batch, rows, context, device, shared=True, vocab_size=model.config.vocab_size)
    tables = [t + [0] for t in fill.decode.block_tables[::rows].tolist()]  # past its blocks: the scratch block
    recordings = DraftRecordings(model, model.mtp[0], mtp_cache, k, tuple(sorted({batch, batch * rows})),
                                 max(len(t) for t in tables), context + 2 * k + 2)
    hidden = torch.randn(batch * rows, model.config.hidden_size, device=device).to(model.dtype)
    args = (hidden, list(range(batch * rows)), fill.tokens.tolist(), fill.positions.tolist(),
            [t for t in tables for _ in range(rows)], list(range(k, batch * rows, rows)),
            [[(context + k + 1 + s, t) for s in range(k - 1)] for t in tables])

    with torch.inference_mode():
        if recordings.run(*args) is None:
            return None
        return time_op(lambda: recordings.run(*args), [()], model.backend, graph=False,
                       target_ms=40.0 if quick else 200.0, min_reps=2 if quick else 5, max_reps=50,
                       warmup=1 if quick else 2).median_ms


def _projected(times: dict[int, float], dense: int, moe: int) -> float:
    """V3's 61-layer step from steps timed with no layer (0), the dense ones and all of them."""
    base, dense_only, full = times[0], times[dense], times[dense + moe]
    per_moe = (full - dense_only) / moe
    per_dense = (dense_only - base) / dense if dense else per_moe  # no dense layer built: counted as MoE
    if per_moe <= 0 or per_dense < 0:  # timing noise larger than a layer (a loaded host): no projection
        return float("nan")
    return base + V3_DENSE * per_dense + (V3_LAYERS - V3_DENSE) * per_moe


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verify step gives a sequence when each draft is accepted with probability `acceptance`."""
    return sum(acceptance ** j for j in range(k + 1))


def model_steps(args, backend: Backend) -> list[dict]:
    """Part 1: one dict per batch with plain, verify and draft times (ms) and the projections."""
    base = load_config(args.config)
    batches = args.batch or [1, 8, 32, 64, 128]
    context = (args.context or [1024])[0]
    precision = args.precision if args.precision != "auto" else "fp8" if backend.capabilities.has_fp8 else "bf16"
    max_seq = context + 2 * max(KS) + 2  # the recurrent drafts run past the verified positions
    layers = args.layers
    if layers is None:
        free = free_memory(backend.device)
        if free is None:
            raise ValueError("pass --layers N on the CPU")
        layers = max(fit_layers(base, precision, free, max(batches), max_seq) - 1, 1)  # one left for the MTP module
    config = bench_config(base, layers)
    dense = config.first_k_dense_replace if config.n_routed_experts else layers
    moe = layers - dense
    if moe == 0:
        raise ValueError("bench spec needs at least one MoE layer (--layers above the dense ones)")
    num_blocks = 1 + max(batches) * -(-max_seq // BLOCK_SIZE)
    started = time.perf_counter()
    model, mtp_cache = _build(config, backend, precision, num_blocks, max_seq)
    print(f"dsv3 bench spec: built {layers} layers ({dense} dense, {moe} MoE) and the MTP module of {args.config} "
          f"({precision}) on {backend.capabilities.name} in {time.perf_counter() - started:.1f} s; context {context}",
          flush=True)
    rows, records = [], False
    for b in batches:
        row = {"batch": b}
        for k in (0, *KS):
            batch = _rows_batch(b, k + 1, context, backend.device, shared=k > 0, vocab_size=model.config.vocab_size)
            times = {}
            for count in sorted({0, dense, layers}):
                with _layers(model, count):
                    times[count], records = _step_ms(model, batch, keep_hidden=k > 0, quick=args.quick)
            name = "plain" if k == 0 else f"verify{k}"
            row[f"{name}_ms"], row[f"{name}_v3_ms"] = times[layers], _projected(times, dense, moe)
            if k:
                row[f"draft{k}_ms"], recorded = _draft_ms(model, mtp_cache, b, k, context, args.quick, rows=records)
                row["draft"] = "recorded" if recorded and row.get("draft", "recorded") == "recorded" else "eager"
        for k in KS:
            row[f"verify{k}_x"] = row[f"verify{k}_ms"] / row["plain_ms"]
            row[f"verify{k}_v3_x"] = row[f"verify{k}_v3_ms"] / row["plain_v3_ms"]
            row[f"speedup{k}_v3"] = expected_tokens(args.acceptance, k) * row["plain_v3_ms"] / (
                row[f"verify{k}_v3_ms"] + row[f"draft{k}_ms"])
        rows.append(row)
        print(_format_row(row), flush=True)
    del model, mtp_cache
    free_memory(backend.device)  # the tiny checkpoint's engine sizes its cache from what is free after this
    return rows


def _format_row(row: dict) -> str:
    verify = "  ".join(f"k={k} {row[f'verify{k}_x']:.2f}x/{row[f'verify{k}_v3_x']:.2f}x" for k in KS)
    draft = " ".join(f"{row[f'draft{k}_ms']:.2f}" for k in KS)
    gain = " ".join(f"{row[f'speedup{k}_v3']:.2f}" for k in KS)
    return (f"batch {row['batch']:>4}: plain {row['plain_ms']:.3f} ms (V3 61 layers {row['plain_v3_ms']:.2f} ms); "
            f"verify / plain (built / V3): {verify}; draft ms ({row['draft']}) k=1,2,3: {draft}; "
            f"projected V3 speed-up k=1,2,3: {gain}")


def stops_paying(rows: list[dict]) -> str:
    """The first measured batch where no k's projected speed-up reaches 1."""
    for row in rows:
        if max(row[f"speedup{k}_v3"] for k in KS) < 1:
            return f"speculation stops paying at batch {row['batch']} (the first measured batch where every k < 1)"
    return f"speculation still pays at the largest measured batch ({rows[-1]['batch']})"


def tiny_end_to_end(args, backend_name: str, device: str | None) -> list[dict]:
    """Part 2: output tokens/s at batch 1 on the tiny checkpoint's own greedy text, plain then k = 1, 2, 3."""
    from dsv3.api import load_model
    from dsv3.serving.params import SamplingParams

    max_tokens, prompts = (32, TINY_PROMPTS[:2]) if args.quick else (256, TINY_PROMPTS)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for k in (None, *KS):
        spec = None if k is None else {"method": "mtp", "num_speculative_tokens": k}
        model = load_model(backend=backend_name, device=device, precision=args.precision, quiet=True,
                           max_model_len=max_tokens + 64, max_num_seqs=4, cache_tokens=4 * (max_tokens + 64),
                           speculative_config=spec)
        try:
            model.generate([TINY_PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0.0))  # warm-up
            before = model.engine.stats().spec_decode
            started, tokens = time.perf_counter(), 0
            for prompt in prompts:
                tokens += len(model.generate([prompt], params)[0].outputs[0].token_ids)
            seconds = time.perf_counter() - started
            after = model.engine.stats().spec_decode
        finally:
            model.shutdown()
        row = {"k": k or 0, "tokens_per_s": tokens / seconds}
        if after is not None:
            drafts = after.num_drafts - before.num_drafts
            accepted = after.num_accepted_tokens - before.num_accepted_tokens
            row["acceptance"] = accepted / max(after.num_draft_tokens - before.num_draft_tokens, 1)
            row["mean_acceptance_length"] = 1 + accepted / max(drafts, 1)
        out.append(row)
    plain = out[0]["tokens_per_s"]
    for row in out:
        row["speedup"] = row["tokens_per_s"] / plain
        extra = "" if not row["k"] else (f", acceptance {row['acceptance']:.1%}, mean acceptance length "
                                         f"{row['mean_acceptance_length']:.2f}")
        print(f"tiny checkpoint, batch 1, {'plain' if not row['k'] else 'k=' + str(row['k'])}: "
              f"{row['tokens_per_s']:.1f} output tok/s, speed-up {row['speedup']:.2f}x{extra}", flush=True)
    return out


def run_command(args, backend: Backend) -> int:
    """`dsv3 bench spec` (dsv3/commands/bench.py parses the options)."""
    from dsv3.errors import Dsv3Error

    try:
        rows = model_steps(args, backend)
    except (ValueError, torch.OutOfMemoryError) as e:
        raise Dsv3Error(f"bench spec: {error_line(e)}") from e
    print(stops_paying(rows))
    one = next((r for r in rows if r["batch"] == 1), None)
    if one is not None:
        best = max(KS, key=lambda k: one[f"speedup{k}_v3"])
        print(f"projected V3 batch-1 speed-up at acceptance {args.acceptance:.2f}: "
              + ", ".join(f"k={k} {one[f'speedup{k}_v3']:.2f}x" for k in KS) + f" (best k={best}; goal >= 1.6x)")
    device = str(backend.device) if args.device else None
    try:
        tiny = tiny_end_to_end(args, args.backend, device)
        best = max(tiny[1:], key=lambda r: r["speedup"])
        print(f"tiny checkpoint, batch 1, end to end: best k={best['k']} {best['speedup']:.2f}x (goal >= 1.3x)")
    except Exception as e:  # noqa: BLE001 - the step measurements above still stand
        tiny = []
        print(f"dsv3 bench spec: the tiny checkpoint's end-to-end run failed: {error_line(e)}")
    if args.json:
        from dsv3.bench.common import save_json

        save_json(args.json, None, [], {"what": "spec", "device": backend.device_name(), "config": args.config,
                                        "acceptance": args.acceptance, "steps": rows, "tiny": tiny})
    return 0
