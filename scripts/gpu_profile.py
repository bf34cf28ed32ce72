"""Where a decode step at batch 1 and a 4096-token prefill spend their device time (one GPU, one call).

Builds DeepSeek-V3 layers with synthetic FP8 weights (as `dsv3 bench decode` does), then prints:
the graph-replayed batch-1 step time, the kernels of an eager batch-1 step ranked by device time (their
sum against the graph time shows what the launches between them cost), and the same for the prefill.
Usage (repository root, on the GPU machine): python3 scripts/gpu_profile.py [--layers N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
from dsv3.backends.cuda import CudaBackend

from dsv3.bench import model_steps
from dsv3.bench.common import time_op
from dsv3.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    backend = CudaBackend()
    config = model_steps.bench_config(load_config("deepseek-v3"), args.layers)
    model = model_steps.build_model(config, backend, "fp8", 1, max(args.tokens, args.context) + 1)
    model_steps.fill_caches(model)
    device = backend.device
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (1,), device=device, generator=g)
    step = model_steps.StaticDecode(model, tokens, args.context)
    prompt = torch.randint(0, config.vocab_size, (1, args.tokens), device=device, generator=g)
    out = {}
    with torch.inference_mode():
        decode = model_steps.profile_step(step.eager, top=args.top)
        prefill = model_steps.profile_step(lambda: model_steps.prefill_last_logits(model, prompt), steps=2,
                                           top=args.top)
        prefill_ms = time_op(lambda: model_steps.prefill_last_logits(model, prompt), [()], backend, graph=False,
                             min_reps=3, max_reps=20).median_ms
        replay = step.recorded()
        graph_ms = time_op(replay, [()], backend, graph=False,
                           target_ms=500, min_reps=3, max_reps=20).median_ms
    for name, profile, ms in (("decode batch 1", decode, graph_ms), ("prefill", prefill, prefill_ms)):
        print(f"\n== {name}: {ms:.3f} ms measured (graph for decode), kernels sum to {profile['step_us'] / 1e3:.3f} ms")
        print(model_steps.format_profile(profile))
        out[name] = {"measured_ms": ms, "profile": profile}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
