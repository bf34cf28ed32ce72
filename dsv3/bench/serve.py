"""`dsv3 bench serve`: requests of random tokens through the serving engine, in this process or over HTTP.

N requests (`--num-prompts`) of random token ids, `--input-len` and `--output-len` long each within
+-`--range-ratio` (vLLM's random dataset), optionally behind a shared `--prefix-len` prefix, are sent at
most `--max-concurrency` at a time, arriving all at once or as a Poisson process of `--request-rate`
requests per second. Every request asks for exactly its output length (greedy, ignore_eos).

Two targets:
- in-process: an AsyncEngine built from the engine flags (dsv3.commands.args), on a checkpoint (`--ckpt`) or
  on synthetic weights at DeepSeek-V3's dimensions (`--config deepseek-v3 --layers N`, like `bench decode`);
- `--url URL`: any OpenAI-compatible server (`dsv3 serve`, `vllm serve`, ...), through streamed
  /v1/completions requests with token-id prompts.

Times are taken here, on the client side, for both targets: TTFT (request sent to first token), ITL (the
gaps between a request's streamed outputs), TPOT ((latency - TTFT) / (tokens - 1) per request), E2EL. The
in-process target also reports the engine's peak cache usage, preemptions and prefix-cache hits, and
(`--static-decode-baseline`, the default on an accelerator) the static batch decode step of `bench
decode` at batch = the concurrency and the run's mean context (prefix + input + output / 2), timed on the
engine's own model and cache pool once the run is over: the engine's output tokens/s over the static
step's is the "vs static" ratio (target: at least 0.9). Where every prompt has the same length
and no prefix, the run is also set beside the static path on the same tokens: each prompt prefilled alone,
then its tokens decoded at the static step's rate ("static time / engine time": what the engine costs).

The requests, the targets and the load are in dsv3/bench/serve_load.py, the record and its result block in
dsv3/bench/serve_records.py; this module holds the runs and the CLI.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time

from dsv3.bench.common import Record, error_line, save_json, time_op
from dsv3.bench.serve_load import EngineTarget, EngineWatch, HttpTarget, random_requests, run_load
from dsv3.bench.serve_records import (
    add_baseline,
    add_speculative,
    add_static,
    add_static_work,
    check_record,
    format_record,
    read_baseline,
    summarize,
)
from dsv3.errors import Dsv3Error, UsageError
from dsv3.serving.structured import StructuredOutputsParams


def add_arguments(p) -> None:
    """`bench serve`'s options, and the engine's flags (dsv3.commands.args) that `bench` does not already
    have (--backend, --device and --config are bench's)."""
    import argparse

    from dsv3.commands.args import add_engine_arguments

    g = p.add_argument_group("serve (the load)")
    g.add_argument("--num-prompts", type=int, help="requests to send (default 1000 on an accelerator, 64 on the "
                   "CPU; --quick: 4 x the concurrency)")
    g.add_argument("--input-len", type=int, help=f"prompt tokens per request (default {INPUT_LEN}, less where the "
                   "model's context is shorter)")
    g.add_argument("--output-len", type=int, help=f"tokens each request generates (default {OUTPUT_LEN}, less where "
                   "the model's context is shorter)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn uniformly within +- this "
                   "fraction of --input-len and --output-len (default 0)")
    g.add_argument("--prefix-len", type=int, default=0, help="random tokens shared by every prompt, before its "
                   "own --input-len (default 0)")
    g.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at most (default 64)")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests per second, Poisson arrivals "
                   "(default inf: all at once, held back by --max-concurrency)")
    g.add_argument("--num-warmups", type=int, help="requests sent before the run, not counted (default: the "
                   "concurrency; each decodes until they all have been prefilled)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals (default 0)")
    g.add_argument("--url", help="drive an OpenAI-compatible server at URL (http://host:port) instead of an "
                   "engine in this process")
    g.add_argument("--model", help="--url: the model name to ask for (default: the first of /v1/models)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="--url: bearer token (default "
                   "$OPENAI_API_KEY)")
    g.add_argument("--vocab-size", type=int, help="--url: prompt token ids are drawn below this (default: the "
                   "vocabulary of --ckpt, else of the built-in tiny checkpoint)")
    g.add_argument("--structured-output", choices=("json",), help="in-process: run the load a second time on the "
                   "same engine with a JSON schema on every request and report the grammar's cost: median TPOT "
                   "and output tokens/s of both runs (json_tpot_overhead: the schema run's median TPOT over the "
                   "plain run's, minus 1). Needs a checkpoint whose tokenizer has JSON's characters (--ckpt; "
                   "make_dummy_checkpoint.py --real-tokenizer for V3's)")
    g.add_argument("--baseline", metavar="FILE", help="an earlier bench serve JSON (e.g. the in-process run) to "
                   "print this run's output throughput against")
    g.add_argument("--static-decode-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also time bench decode's static step at the concurrency and the mean context (default: "
                   "on an accelerator, in-process)")
    engine = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(engine)
    group = p.add_argument_group("serve (the engine, in-process)")
    taken = set(p._option_string_actions) | {"--random-weights"}  # --config here is always synthetic weights
    meanings = {"ckpt": "checkpoint to serve (default: synthetic weights of --config with --layers)",
                "max_model_len": "the longest sequence (default: the longest request of the run)"}
    for action in engine._actions:
        if not any(option in taken for option in action.option_strings):
            action.help = meanings.get(action.dest, action.help)
            group._add_action(action)


def _load(args, num_prompts: int) -> dict:
    return {"num_prompts": num_prompts, "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
            "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
            "prefix_len": args.prefix_len}


INPUT_LEN, OUTPUT_LEN = 1024, 128


def _default_lengths(args, context: int | None) -> None:
    """--input-len and --output-len where not given: 1024 and 128, scaled down to fit `context` (the model's
    max_position_embeddings; None: no limit known) with the prefix, so the tiny checkpoint runs as it is."""
    room = None if context is None else context - args.prefix_len
    fits = room is None or INPUT_LEN + OUTPUT_LEN <= room
    if args.output_len is None:
        args.output_len = OUTPUT_LEN if fits else max(1, room * OUTPUT_LEN // (INPUT_LEN + OUTPUT_LEN))
    if args.input_len is None:
        args.input_len = INPUT_LEN if fits else max(1, room - args.output_len)


def _check(args) -> None:
    for name in ("input_len", "output_len", "max_concurrency"):
        if getattr(args, name) < 1:
            raise UsageError(f"bench serve: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("prefix_len", "seed"):
        if getattr(args, name) < 0:
            raise UsageError(f"bench serve: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UsageError(f"bench serve: --num-prompts must be at least 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise UsageError(f"bench serve: --request-rate must be positive (inf: all at once), got {args.request_rate}")
    if not 0 <= args.range_ratio < 1:
        raise UsageError(f"bench serve: --range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UsageError(f"bench serve: --vocab-size must be at least 1, got {args.vocab_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (args.tensor_parallel_size or 1) * args.data_parallel_size > 1 \
            or (args.ep or 1) > 1:
        raise UsageError("bench serve: it drives one engine in one process; run it without torchrun, -tp, -dp or "
                         "--ep")
    if args.num_warmups is not None and args.num_warmups < 0:
        raise UsageError(f"bench serve: --num-warmups must be >= 0, got {args.num_warmups}")
    if args.baseline:
        read_baseline(args.baseline)


def _num_prompts(args, on_host: bool) -> int:
    if args.num_prompts is not None:
        return args.num_prompts
    if args.quick:
        return 4 * args.max_concurrency
    return 64 if on_host else 1000


async def _drive(target, args, vocab_size: int, num_prompts: int):
    """Warm-up requests (not counted), then the run: (results, seconds, the engine's counters before and after,
    its peak cache usage or None)."""
    requests = random_requests(num_prompts, args.input_len, args.output_len, vocab_size, args.range_ratio,
                               args.prefix_len, args.seed)
    warmups = args.max_concurrency if args.num_warmups is None else args.num_warmups
    if warmups:
        # Other prompts (another seed), so that the run's find nothing of theirs in the prefix cache; long enough
        # that the first is still decoding when the last is prefilled, so the full batch's decode step (and, as
        # they finish one by one, the smaller ones) are recorded before the run.
        prefill_steps = -(-warmups * (args.prefix_len + args.input_len) // args.max_num_batched_tokens)
        warm = random_requests(warmups, args.input_len, min(args.output_len, prefill_steps + 8), vocab_size, 0.0,
                               args.prefix_len, args.seed + 1_000_003)
        results, _ = await run_load(target, warm, args.max_concurrency, tag="warmup")
        failed = [r.error for r in results if r.error]
        if failed:
            raise Dsv3Error(f"bench serve: {len(failed)} of {warmups} warm-up requests failed: {failed[0]}")
    watch = EngineWatch(target)
    before = await watch.settled()
    sampler = asyncio.create_task(watch.sample())
    try:
        results, duration = await run_load(target, requests, args.max_concurrency, args.request_rate, args.seed)
    finally:
        sampler.cancel()
    after = await watch.settled()
    return results, duration, before, after, watch.peak_cache_usage


def _report(args, record: Record, payload: dict) -> None:
    if args.baseline:
        add_baseline(record, args.baseline)
    print(format_record(record), flush=True)
    for line in check_record(record):
        print(line)
    if args.json:
        save_json(args.json, None, [record], payload)
        print(f"dsv3 bench serve: wrote {args.json}", file=sys.stderr)


def _payload(device: str, backend: str, ops: dict, model: dict, notes: list[str]) -> dict:
    """The JSON beside the records, as `bench decode` writes it."""
    return {"what": "serve", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device, "backend": backend,
            "ops": ops, "model": model, "notes": notes}


def run_url(args) -> int:
    """`dsv3 bench serve --url URL`."""
    _default_lengths(args, None)
    _check(args)
    num_prompts = _num_prompts(args, on_host=False)
    vocab_size = args.vocab_size or _vocab_size(args)

    async def main():
        target = HttpTarget(args.url, args.model, args.api_key, args.max_concurrency)
        try:
            model = await target.resolve_model()
            return model, *(await _drive(target, args, vocab_size, num_prompts))
        finally:
            await target.close()

    model, results, duration, before, after, peak = asyncio.run(main())
    record = summarize(results, duration, f"{args.url} {model}", args.url, _load(args, num_prompts), before, after,
                       peak)
    _report(args, record, _payload(args.url, "http", {}, {"name": model, "vocab_size": vocab_size}, []))
    return 0 if record.metrics["completed"] else 1


def _vocab_size(args) -> int:
    from dsv3.api import TINY_CHECKPOINT
    from dsv3.config import load_config

    return load_config(getattr(args, "ckpt", None) or TINY_CHECKPOINT).vocab_size


def _longest(args) -> int:
    """The longest request of the dataset: prefix, prompt and output, each at its +range_ratio end."""
    return (args.prefix_len + math.ceil(args.input_len * (1 + args.range_ratio))
            + math.ceil(args.output_len * (1 + args.range_ratio)))


def _load_model(args, static_context: int):
    """The Model (with its engine) of --ckpt, or of --config with --layers layers (default: as many as fit
    beside a cache for the concurrency at the longest request, as `bench decode` fits them)."""
    from dsv3.backends.select import select
    from dsv3.commands.args import engine_args
    from dsv3.config import load_config

    engine_args(args, model=None)  # every flag checked before the backend starts
    backend, _ = select(args.backend, args.device)
    source, described = args.ckpt, {"ckpt": args.ckpt}
    if not args.ckpt:
        from dsv3.bench.harness import bench_config, fit_layers, free_memory

        base = load_config(args.config)
        layers = args.layers
        if layers is None:
            free = free_memory(backend.device)
            if free is None:
                raise UsageError("bench serve: pass --layers N with --config on the CPU (or --ckpt DIR)")
            precision = "fp8" if backend.capabilities.has_fp8 and args.precision in ("auto", "fp8") else "bf16"
            layers = fit_layers(base, precision, free, args.max_concurrency, max(_longest(args), static_context))
        source = bench_config(base, layers)
        described = {"config": str(base.source), "layers": layers,
                     "moe_layers": sum(source.is_moe_layer(i) for i in range(layers))}
    model = engine_args(args, model=source, backend=backend).build()
    layers = model.config.num_hidden_layers
    described.update(layers=layers, moe_layers=sum(model.config.is_moe_layer(i) for i in range(layers)),
                     load_format=getattr(args, "load_format", "auto"))
    described.update(precision=model.precision, max_model_len=model.max_model_len,
                     num_blocks=model.engine.config.num_blocks, block_size=model.engine.config.block_size,
                     max_num_seqs=model.engine.config.max_num_seqs,
                     max_num_batched_tokens=model.engine.config.max_num_batched_tokens,
                     enable_prefix_caching=model.engine.config.enable_prefix_caching,
                     enforce_eager=model.engine.config.enforce_eager)
    return model, described


def static_decode_ms(model, batch: int, context: int, quick: bool = False) -> tuple[float, str]:
    """(ms, "graph" or "eager"): `bench decode`'s static step (harness.StaticDecode) on the engine's model and
    cache pool, timed as `bench decode` times it: `batch` sequences with `context` random latents cached each,
    one new token each, replayed from a recording where the backend makes one. Run while the engine is idle:
    it overwrites the pool."""
    import torch

    from dsv3.bench.harness import BLOCK_SIZE, StaticDecode, fill_caches

    transformer, config = model.transformer, model.engine.config
    if config.block_size != BLOCK_SIZE:
        raise Dsv3Error(f"bench serve: the static step lays sequences out in blocks of {BLOCK_SIZE}; the engine's "
                        f"are {config.block_size} (--block-size)")
    needed = 1 + batch * -(-(context + 1) // BLOCK_SIZE)
    if needed > config.num_blocks:
        raise Dsv3Error(f"bench serve: the static step needs {needed} blocks, the engine's pool has "
                        f"{config.num_blocks}")
    device = transformer.backend.device
    fill_caches(transformer)
    g = torch.Generator(device).manual_seed(1)
    step = StaticDecode(transformer, torch.randint(0, transformer.config.vocab_size, (batch,), device=device,
                                                   generator=g), context)
    with torch.inference_mode():
        fn = step.recorded() if not config.enforce_eager and transformer.supports_graphs() else None
        mode = "eager" if fn is None else "graph"
        timing = time_op(fn or step.eager, [()], transformer.backend, graph=False, warmup=1 if quick else 2,
                         target_ms=100.0 if quick else 300.0, min_reps=2 if quick else 3, max_reps=20)
    return timing.median_ms, mode


def static_prefill_ms(model, tokens: int, quick: bool = False) -> float:
    """One prompt of `tokens` random tokens prefilled alone on the engine's model (harness.prefill_last_logits,
    eager, as `bench prefill` runs it). Run while the engine is idle: it overwrites the pool's first blocks."""
    import torch

    from dsv3.bench.harness import prefill_last_logits

    transformer = model.transformer
    device = transformer.backend.device
    g = torch.Generator(device).manual_seed(2)
    prompt = torch.randint(0, transformer.config.vocab_size, (1, tokens), device=device, generator=g)
    with torch.inference_mode():
        return time_op(lambda: prefill_last_logits(transformer, prompt), [()], transformer.backend, graph=False,
                       warmup=1, target_ms=100.0 if quick else 300.0, min_reps=2 if quick else 3,
                       max_reps=10).median_ms


def run_engine(args) -> int:
    """`dsv3 bench serve` in this process."""
    from dsv3.config import load_config

    _default_lengths(args, load_config(args.ckpt or args.config).max_position_embeddings)
    _check(args)
    static_context = args.prefix_len + args.input_len + args.output_len // 2
    if args.max_model_len is None:
        args.max_model_len = _longest(args)
    model, described = _load_model(args, static_context)
    device = model.backend.device
    num_prompts = _num_prompts(args, on_host=device.type == "cpu")
    static = args.static_decode_baseline
    if static is None:
        static = device.type != "cpu"
    notes: list[str] = []
    try:
        async def main():
            return await _drive(EngineTarget(model.async_engine), args, model.config.vocab_size, num_prompts)

        results, duration, before, after, peak = asyncio.run(main())
        name = model.backend.capabilities.name
        record = summarize(results, duration, f"dsv3 engine in-process ({name})", "in-process",
                           _load(args, num_prompts), before, after, peak)
        if args.structured_output:  # the same load again on the same engine, every request under a grammar
            target = EngineTarget(model.async_engine)
            target.structured_outputs = StructuredOutputsParams(json=BENCH_SCHEMA)

            async def constrained():
                return await _drive(target, args, model.config.vocab_size, num_prompts)

            add_structured(record, summarize(*asyncio.run(constrained())[:2], "JSON schema on every request",
                                             "in-process", _load(args, num_prompts)))
        if model.engine.proposer is not None:  # the same load again on the same engine, its proposer detached
            model.engine.proposer = None
            plain = summarize(*asyncio.run(main())[:2], "without speculation", "in-process", _load(args, num_prompts))
            add_speculative(record, before, after, plain)
        if static:
            try:
                ms, mode = static_decode_ms(model, args.max_concurrency, static_context, args.quick)
                add_static(record, ms, args.max_concurrency, static_context)
                notes.append(f"static decode step: {mode}")
                if args.prefix_len == 0 and args.range_ratio == 0:  # every prompt the same length, none cached
                    add_static_work(record, static_prefill_ms(model, args.input_len, args.quick))
            except Exception as e:  # noqa: BLE001 - no baseline is a note, not a failed run
                notes.append(f"static decode step not timed: {error_line(e)}")
                print(f"dsv3 bench serve: static decode step not timed: {error_line(e)}", file=sys.stderr)
    finally:
        model.shutdown()
    ops = dict(model.backend.capabilities.ops)
    _report(args, record, _payload(model.backend.device_name(), name, ops, described, notes))
    return 0 if record.metrics["completed"] else 1


#: the schema of --structured-output json: an object whose one field can run to any length, so requests keep
#: decoding (a grammar that ends stops its request, ignore_eos or not)
BENCH_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def add_structured(record: Record, constrained: Record) -> None:
    """The grammar's cost beside the plain run: json_median_tpot_ms, json_output_throughput, json_tpot_overhead."""
    m, c = record.metrics, constrained.metrics
    m["json_median_tpot_ms"], m["json_output_throughput"] = c["median_tpot_ms"], c["output_throughput"]
    m["json_completed"] = c["completed"]
    m["json_tpot_overhead"] = (c["median_tpot_ms"] / m["median_tpot_ms"] - 1
                               if c["median_tpot_ms"] and m["median_tpot_ms"] else None)
    print(f"dsv3 bench serve: JSON schema on every request: median TPOT {c['median_tpot_ms']:.2f} ms vs "
          f"{m['median_tpot_ms']:.2f} ms plain ({m['json_tpot_overhead']:+.1%}), output "
          f"{c['output_throughput']:.1f} vs {m['output_throughput']:.1f} tok/s" if m["json_tpot_overhead"] is not None
          else "dsv3 bench serve: JSON schema run: no TPOT to compare", file=sys.stderr)


def run_command(args) -> int:
    """`dsv3 bench serve` (dsv3/commands/bench.py parses the options)."""
    if args.url:
        return run_url(args)
    return run_engine(args)
