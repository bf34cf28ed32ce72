"""Where a decode step and a prefill spend their device time (one GPU, one call).

Builds a model of a config's layer dimensions with synthetic FP8 weights (as `dsv3 bench decode` does),
then prints the graph-replayed decode step time and the kernels of that replay ranked by device time
(their sum against the replay time shows the gaps between them), the same for the eager decode step
(what a step costs where nothing is recorded), and for an eager prefill.
Usage (repository root, on the GPU machine):
    python3 scripts/gpu_profile.py [--config deepseek-v2-lite] [--layers N] [--batch 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
from dsv3.backends.cuda import CudaBackend

from dsv3.bench import harness
from dsv3.bench.common import time_op
from dsv3.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deepseek-v3")
    parser.add_argument("--layers", type=int, default=None, help="layers to build (default: all of the config's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048, help="prefill tokens (0: no prefill)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    backend = CudaBackend()
    base = load_config(args.config)
    config = harness.bench_config(base, args.layers or base.num_hidden_layers)
    model = harness.build_model(config, backend, "fp8", args.batch, max(args.tokens, args.context) + 1)
    harness.fill_caches(model)
    device = backend.device
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (args.batch,), device=device, generator=g)
    step = harness.StaticDecode(model, tokens, args.context)
    out = {}
    with torch.inference_mode():
        replay = step.recorded()
        graph_ms = time_op(replay, [()], backend, graph=False, target_ms=500, min_reps=3, max_reps=50).median_ms
        runs = [("decode replay", harness.profile_step(replay, top=args.top), graph_ms)]
        eager_ms = time_op(step.eager, [()], backend, graph=False, min_reps=3, max_reps=20).median_ms
        runs.append(("decode eager", harness.profile_step(step.eager, top=args.top), eager_ms))
        if args.tokens:
            prompt = torch.randint(0, config.vocab_size, (1, args.tokens), device=device, generator=g)
            prefill = lambda: harness.prefill_last_logits(model, prompt)  # noqa: E731
            prefill_ms = time_op(prefill, [()], backend, graph=False, min_reps=3, max_reps=20).median_ms
            runs.append(("prefill eager", harness.profile_step(prefill, steps=2, top=args.top), prefill_ms))
    what = f"{args.config}, {config.num_hidden_layers} layers, batch {args.batch}, context {args.context}"
    for name, profile, ms in runs:
        print(f"\n== {name} ({what}): {ms:.3f} ms measured, kernels sum to {profile['step_us'] / 1e3:.3f} ms")
        print(harness.format_profile(profile))
        out[name] = {"measured_ms": ms, "profile": profile, "what": what}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
