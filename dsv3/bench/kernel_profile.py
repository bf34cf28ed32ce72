"""`dsv3 bench profile`: where a decode step and a prefill spend their time, kernel by kernel.

Builds the model of `dsv3 bench decode` (a config's layer dimensions, synthetic weights, as many layers
as fit unless `--layers`), then ranks by device time (CPU time on a backend without device activity) the
kernels of: one eager decode step, one eager prefill of `--tokens` tokens, and the decode step replayed
from a recording where the backend records one. Each profile prints beside the step's measured time:
their difference is the gaps between kernels. The eager runs come first: the profiler is known to
misbehave on eager work once a graph has been recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3.backends.interface import Backend
from dsv3.bench.common import time_op
from dsv3.bench.harness import (
    StaticDecode,
    bench_config,
    build_model,
    fill_caches,
    fit_layers,
    format_profile,
    free_memory,
    prefill_last_logits,
    profile_step,
)
from dsv3.config import ModelConfig, load_config
from dsv3.errors import Dsv3Error

TOP = 25  # kernels listed per profile


def run_profile(backend: Backend, base: ModelConfig, layers: int | None = None, batch: int = 1,
                context: int = 1024, tokens: int = 4096, json_path: str | None = None) -> dict:
    """Profile a decode step at `batch` x `context` (eager, then replayed) and an eager prefill of
    `tokens` tokens; print each and return {name: {"measured_ms", "profile"}} (profile: harness.profile_step's,
    with "what")."""
    precision = "fp8" if backend.capabilities.has_fp8 else "bf16"
    max_seq = max(tokens, context) + 1
    if max_seq > base.max_position_embeddings:
        raise Dsv3Error(f"bench profile: {max_seq} positions exceed the config's max_position_embeddings="
                        f"{base.max_position_embeddings}")
    if layers is None:
        free = free_memory(backend.device)
        layers = base.num_hidden_layers if free is None else fit_layers(base, precision, free, batch, max_seq)
    config = bench_config(base, layers)
    model = build_model(config, backend, precision, batch, max_seq)
    fill_caches(model)
    g = torch.Generator(backend.device).manual_seed(1)
    decode_tokens = torch.randint(0, config.vocab_size, (batch,), device=backend.device, generator=g)
    prompt = torch.randint(0, config.vocab_size, (1, tokens), device=backend.device, generator=g)
    step = StaticDecode(model, decode_tokens, context)
    what = f"{Path(str(base.source)).stem}, {layers} layers, {precision}"
    runs = {}

    def add(name: str, fn, steps: int, case: str) -> None:
        measured = time_op(fn, [()], backend, graph=False, min_reps=3, max_reps=20).median_ms
        profile = {**profile_step(fn, steps=steps, top=TOP), "what": f"{name}: {what}, {case}"}
        runs[name] = {"measured_ms": measured, "profile": profile}
        print(f"\n== {name}: {measured:.3f} ms measured, kernels sum to {profile['step_us'] / 1e3:.3f} ms", flush=True)
        print(format_profile(profile), flush=True)

    with torch.inference_mode():
        add("decode eager", step.eager, 3, f"batch {batch}, context {context}")
        add("prefill eager", lambda: prefill_last_logits(model, prompt), 2, f"{tokens} tokens")
        replay = step.recorded()
        if replay is None:
            print(f"\n== decode replay: backend {backend.capabilities.name} records no graphs", flush=True)
        else:
            add("decode replay", replay, 3, f"batch {batch}, context {context}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"device": str(backend.device), "backend": backend.capabilities.name,
                                               "runs": runs}, indent=1))
    return runs


def run_command(args, backend: Backend) -> int:
    """`dsv3 bench profile` (dsv3/commands/bench.py parses the options; the first --batch and --context)."""
    batch = (args.batch or [1])[0]
    context = (args.context or [1024])[0]
    if batch < 1 or context < 1 or args.tokens < 1:
        raise Dsv3Error(f"bench profile: --batch, --context and --tokens must be positive, got {batch}, {context}, "
                        f"{args.tokens}")
    run_profile(backend, load_config(args.config), args.layers, batch, context, args.tokens, args.json)
    return 0
