"""`dsv3 bench decode|prefill`: whole model steps at DeepSeek-V3's layer dimensions, beside their floor.

The model is configs/deepseek-v3.yaml with fewer layers (dense first, then MoE, as in V3; at least
one MoE layer): `--layers N`, or as many as fit in the device's free memory with 15% to spare. Its
weights are synthetic FP8 made on the device (RandomSource(fast=True)). Decode runs at batch 1, 16,
64 and 128 with 1k and 8k tokens already in every sequence's cache (random latents are written
into the cache instead of running a long prefill), as harness.StaticDecode: each sequence in its own
blocks of the paged cache, replayed from a recording where the backend makes one, and eagerly;
prefill runs 4096 tokens of one sequence up to the last token's logits.

The floor of a step is max(bytes / copy bandwidth, FP8 FLOPs / FP8 block-wise rate + other FLOPs /
BF16 rate), all measured in the same run (common.measure_roofline). Bytes: every weight the step
reads once (of the routed experts only those the batch hits, counted during the run), the cache
rows attention reads, the float32 logits written. FLOPs: 2 per multiply-add of the linears (FP8
class), and of absorbed attention over the cache, the router and the head (BF16 class; prefill
counts the non-absorbed attention over causal pairs and the kv_b expansion instead).

The reference backend on the same device is the naive peer (batch 1, eager: it synchronises the
host). One decode step at batch 64 is profiled (torch.profiler, top kernels by device time).

The cost model, floor and records are in dsv3/bench/steps.py; sizing, building, timing and
profiling the model in dsv3/bench/harness.py. This module holds the runs, the report and the CLI.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from dsv3.backends.interface import Backend
from dsv3.bench.common import (
    Record,
    Roofline,
    error_line,
    format_roofline,
    format_table,
    measure_roofline,
    save_json,
    time_op,
)
from dsv3.bench.harness import (
    ExpertCounter,
    StaticDecode,
    bench_config,
    build_model,
    fill_caches,
    fit_layers,
    format_profile,
    free_memory,
    model_weight_bytes,
    prefill_last_logits,
    profile_step,
)
from dsv3.bench.steps import (
    _moe_layers,
    decode_cost,
    link_reference,
    make_record,
    prefill_cost,
    summary_lines,
)
from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.model import Transformer

DECODE_BATCHES: tuple[int, ...] = (1, 16, 64, 128)
CONTEXTS: tuple[int, ...] = (1024, 8192)
PREFILL_TOKENS = 4096
QUICK_BATCHES: tuple[int, ...] = (1, 64)
QUICK_CONTEXTS: tuple[int, ...] = (1024,)
PROFILE_BATCH = 64


# ---- the report ----------------------------------------------------------------------------

class Report:
    """The run's records, written to JSON after each one (a run cut short keeps what it timed)."""

    def __init__(self, what: str, backend: Backend, roofline: Roofline, path: str | None, model: dict):
        self.path, self.roofline, self.records = path, roofline, []
        self.payload = {"what": what, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "device": roofline.device_name, "backend": backend.capabilities.name,
                        "ops": dict(backend.capabilities.ops), "model": model, "notes": [], "profile": None}

    def add(self, record: Record) -> None:
        self.records.append(record)
        link_reference(self.records)
        lines = format_table([record]).splitlines()
        print("\n".join(lines if len(self.records) == 1 else lines[-1:]), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            save_json(self.path, self.roofline, self.records, self.payload)


def _describe(config: ModelConfig, precision: str, max_batch: int, max_seq: int, free: int | None) -> dict:
    moe = _moe_layers(config)
    return {"config": config.source, "layers": config.num_hidden_layers,
            "dense_layers": config.num_hidden_layers - len(moe), "moe_layers": len(moe),
            "precision": precision, "max_batch_size": max_batch, "max_seq_len": max_seq,
            "weights_gb": model_weight_bytes(config, precision) / 1e9,
            "free_memory_gb": None if free is None else free / 1e9}


# ---- the runs ---------------------------------------------------------------------------------

def _setup(what: str, backend: Backend, base: ModelConfig, layers: int | None, max_batch: int, max_seq: int,
           quick: bool, json_path: str | None) -> tuple[ModelConfig, str, Roofline, Report]:
    precision = "fp8" if backend.capabilities.has_fp8 else "bf16"
    if max_seq > base.max_position_embeddings:
        raise Dsv3Error(f"bench: {max_seq} positions exceed the config's max_position_embeddings="
                        f"{base.max_position_embeddings}")
    device = backend.device
    on_host = device.type == "cpu"  # a small roofline there: 8192^3 would take minutes
    roofline = measure_roofline(backend, size=512 if on_host else 8192, copy_bytes=(32 << 20) if on_host else (1 << 30))
    print(format_roofline(roofline) + (" (on the CPU: matmul 512^3)" if on_host else ""), flush=True)
    free = free_memory(device)
    if layers is None:
        layers = base.num_hidden_layers if free is None else fit_layers(base, precision, free, max_batch, max_seq)
    config = bench_config(base, layers)
    report = Report(what, backend, roofline, json_path, _describe(config, precision, max_batch, max_seq, free))
    m = report.payload["model"]
    print(f"dsv3 bench {what}: {m['layers']} layers ({m['dense_layers']} dense, {m['moe_layers']} MoE) of "
          f"{Path(str(base.source)).stem}, {precision} weights {m['weights_gb']:.1f} GB, cache for batch "
          f"{max_batch} x {max_seq} tokens" + (f", {free / 1e9:.1f} GB were free" if free else ""), flush=True)
    return config, precision, roofline, report


def run_decode(backend: Backend, base: ModelConfig, layers: int | None = None,
               batches: Sequence[int] = DECODE_BATCHES, contexts: Sequence[int] = CONTEXTS,
               quick: bool = False, reference: bool = True, json_path: str | None = None,
               profile: bool = True) -> list[Record]:
    """Time decode steps of `backend` (graph and eager) and of the reference backend; returns the records."""
    device = backend.device
    max_batch, max_seq = max(batches), max(contexts) + 1
    config, precision, roofline, report = _setup("decode", backend, base, layers, max_batch, max_seq, quick,
                                                 json_path)
    model = build_model(config, backend, precision, max_batch, max_seq)
    fill_caches(model)
    graphs = True
    name = backend.capabilities.name
    g = torch.Generator(device).manual_seed(1)
    with torch.inference_mode():
        if profile:  # before any graph exists: the profiler is known to misbehave when graphs came first
            _profile_decode(model, report, PROFILE_BATCH if PROFILE_BATCH in batches else max(batches),
                            contexts[0], g)
        for batch in sorted(batches):
            tokens = torch.randint(0, config.vocab_size, (batch,), device=device, generator=g)
            hits = None
            for context in contexts:
                step = StaticDecode(model, tokens, context)
                if hits is None:
                    with ExpertCounter(backend) as counter:
                        step.eager()
                    hits = counter.hits or None
                cost = decode_cost(config, precision, batch, context, hits)
                for mode in ("graph", "eager") if graphs else ("eager",):
                    record = partial(make_record, "decode", f"dsv3 {name} ({mode})", True, batch, context,
                                     config.num_hidden_layers, cost, roofline)
                    try:
                        fn = step.eager
                        if mode == "graph":
                            fn = step.recorded()
                            if fn is None:
                                graphs = False
                                report.payload["notes"].append(f"backend {name} records no graphs: decode is eager")
                                continue
                        timing = time_op(fn, [()], backend, graph=False, warmup=1 if quick else 2,
                                         target_ms=100.0 if quick else 300.0, min_reps=2 if quick else 3, max_reps=20)
                    except Exception as e:  # noqa: BLE001 - a failure is a result
                        report.add(record(None, batch, hits, error=error_line(e)))
                        continue
                    finally:
                        fn = None  # a recorded step's memory goes with it
                    report.add(record(timing.median_ms, batch, hits, note=f"{timing.reps} steps"))
    step = model = None
    free_memory(device)
    if reference and name != "reference":
        _time_reference(backend, config, precision, roofline, report, contexts)
    print(format_table(report.records))
    for line in summary_lines(report.records):
        print(line)
    report.save()
    return report.records


def _profile_decode(model: Transformer, report: Report, batch: int, context: int, generator) -> None:
    """Profile one eager decode step (the kernels a graph replays, each seen by the profiler)."""
    device = model.backend.device
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device, generator=generator)
    try:
        result = profile_step(StaticDecode(model, tokens, context).eager)
        result["what"] = f"decode batch {batch} context {context}, kernels of an eager step"
        print(format_profile(result), flush=True)
    except Exception as e:  # noqa: BLE001 - no profile is a result, not a failed run
        result = {"error": error_line(e)}
    report.payload["profile"] = result
    report.save()


def _time_reference(backend: Backend, config: ModelConfig, precision: str, roofline: Roofline, report: Report,
                    contexts: Sequence[int]) -> None:
    """The reference backend on the same device at batch 1 (eager; few steps: it is slow)."""
    from dsv3.backends.reference import ReferenceBackend

    device = backend.device
    reference = ReferenceBackend(device)
    try:
        model = build_model(config, reference, precision, 1, max(contexts) + 1)
    except Exception as e:  # noqa: BLE001
        report.payload["notes"].append(f"reference backend not timed: {error_line(e)}")
        return
    fill_caches(model)
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1,), device=device, generator=g)
    with torch.inference_mode():
        for context in contexts:
            cost = decode_cost(config, precision, 1, context, None)
            try:
                timing = time_op(StaticDecode(model, tokens, context).eager, [()], reference, graph=False,
                                 warmup=1, target_ms=0.0, min_reps=2, max_reps=2)
            except Exception as e:  # noqa: BLE001
                report.add(make_record("decode", "reference backend (eager)", False, 1, context,
                                       config.num_hidden_layers, cost, roofline, None, 1, None, error=error_line(e)))
                continue
            report.add(make_record("decode", "reference backend (eager)", False, 1, context,
                                   config.num_hidden_layers, cost, roofline, timing.median_ms, 1, None,
                                   note=f"{timing.reps} steps, the same layers"))
    model = None
    free_memory(device)


def run_prefill(backend: Backend, base: ModelConfig, layers: int | None = None, tokens: int = PREFILL_TOKENS,
                quick: bool = False, json_path: str | None = None) -> list[Record]:
    """Time a prefill of `tokens` tokens (batch 1) up to the last token's logits; returns the records."""
    device = backend.device
    config, precision, roofline, report = _setup("prefill", backend, base, layers, 1, tokens, quick, json_path)
    model = build_model(config, backend, precision, 1, tokens)
    name = backend.capabilities.name
    g = torch.Generator(device).manual_seed(2)
    prompt = torch.randint(0, config.vocab_size, (1, tokens), device=device, generator=g)
    with torch.inference_mode():
        with ExpertCounter(backend) as counter:
            prefill_last_logits(model, prompt)
        hits = counter.hits or None
        cost = prefill_cost(config, precision, tokens, hits)
        impl = f"dsv3 {name} (eager)"
        try:
            timing = time_op(partial(prefill_last_logits, model, prompt), [()], backend, graph=False, warmup=1,
                             target_ms=100.0 if quick else 500.0, min_reps=3, max_reps=10)
            report.add(make_record("prefill", impl, True, 1, tokens, config.num_hidden_layers, cost, roofline,
                                   timing.median_ms, tokens, hits, note=f"{timing.reps} steps"))
        except Exception as e:  # noqa: BLE001
            report.add(make_record("prefill", impl, True, 1, tokens, config.num_hidden_layers, cost, roofline, None,
                                   tokens, hits, error=error_line(e)))
    model = None
    free_memory(device)
    print(format_table(report.records))
    for line in summary_lines(report.records):
        print(line)
    report.save()
    return report.records


def run_command(args, backend: Backend) -> int:
    """`dsv3 bench decode|prefill` (dsv3/commands/bench.py parses the options)."""
    from dsv3.config import load_config

    base = load_config(args.config)
    for name in ("batch", "context"):
        if any(v < 1 for v in getattr(args, name) or ()):
            raise Dsv3Error(f"bench: --{name} values must be positive, got {getattr(args, name)}")
    if args.tokens < 1:
        raise Dsv3Error(f"bench: --tokens must be positive, got {args.tokens}")
    if args.what == "prefill":
        run_prefill(backend, base, args.layers, args.tokens, args.quick, args.json)
        return 0
    batches = tuple(args.batch or (QUICK_BATCHES if args.quick else DECODE_BATCHES))
    contexts = args.context or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    longest = base.max_position_embeddings - 1
    if max(contexts) > longest:
        print(f"dsv3 bench: contexts above {longest} (the config's max_position_embeddings - 1) become {longest}",
              file=sys.stderr)
    contexts = tuple(dict.fromkeys(min(c, longest) for c in contexts))
    run_decode(backend, base, args.layers, batches, contexts, args.quick, not args.no_reference, args.json)
    return 0


def print_saved_runs(paths: Sequence[str]) -> None:
    """Saved decode/prefill runs (their --json files) in short: the table, the targets, the top kernels."""
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: unreadable ({e})")
            continue
        model = payload.get("model", {})
        print(f"{path}: {payload.get('device')}, {model.get('layers')} layers ({model.get('dense_layers')} dense, "
              f"{model.get('moe_layers')} MoE), {payload.get('date')}")
        records = [Record.from_dict(r) for r in payload.get("records", [])]
        if records:
            print(format_table(records))
        for line in summary_lines(records) or ["no timed rows"]:
            print("  " + line)
        for note in payload.get("notes", []):
            print("  note: " + note)
        profile = payload.get("profile") or {}
        if profile.get("rows"):
            print(format_profile({**profile, "rows": profile["rows"][:8]}))
        elif profile.get("error"):
            print(f"  profile failed: {profile['error']}")
