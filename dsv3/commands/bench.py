"""`dsv3 bench gemm|moe|mla|all`: kernels at the DeepSeek-V3 shapes beside their peers and the roofline;
`dsv3 bench decode|prefill`: whole model steps at DeepSeek-V3's layer dimensions beside their floor;
`dsv3 bench profile`: the kernels of a decode step and a prefill, ranked by device time;
`dsv3 bench serve`: requests through the serving engine in this process, or an OpenAI-compatible server;
`dsv3 bench spec`: MTP speculative decoding's verify and draft steps beside the plain decode step."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from dsv3.errors import Dsv3Error, UsageError

WHAT = ("gemm", "moe", "mla", "all", "decode", "prefill", "profile", "serve", "spec")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=WHAT, help="which ops to time (all: gemm, moe and mla), whole decode or "
                   "prefill steps, their kernels (profile), requests through the serving engine (serve), or MTP "
                   "speculative decoding's steps beside the plain decode step (spec)")
    p.add_argument("--backend", help="backend under test (default cuda; serve: picked from the hardware, as dsv3 "
                   "serve picks it)")
    p.add_argument("--device", help="torch device for the backend (default: the backend's)")
    p.add_argument("--json", metavar="FILE", help="also write the roofline, environment and records as JSON")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) reference-backend peer")
    steps = p.add_argument_group("decode, prefill, profile and spec (profile and spec take the first --context)")
    steps.add_argument("--config", default="deepseek-v3", help="model config whose layer dimensions to use "
                       "(default deepseek-v3)")
    steps.add_argument("--layers", type=int, help="layers to build (default: as many as fit, dense first)")
    steps.add_argument("--batch", type=int, nargs="+", help="decode batch sizes (default 1 16 64 128)")
    steps.add_argument("--context", type=int, nargs="+", help="tokens cached per sequence (default 1024 8192)")
    steps.add_argument("--tokens", type=int, default=4096, help="prefill tokens (default 4096)")
    steps.add_argument("--acceptance", type=float, default=0.85, help="spec: the draft acceptance rate the "
                       "projected speed-up assumes (default 0.85, DeepSeek's published 85-90%% for the MTP token)")
    from dsv3.bench import serve

    serve.add_arguments(p)


def _bench_module(name: str):
    """dsv3.bench.<name>, or None where that module does not exist (yet)."""
    try:
        return importlib.import_module(f"dsv3.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"dsv3.bench.{name}":
            raise
        return None


def run(args: argparse.Namespace) -> int:
    from dsv3.backends.registry import create_backend
    from dsv3.bench import common
    from dsv3.commands.conformance import check_output_file

    if args.json:  # refused now, not after the whole bench has run
        check_output_file(Path(args.json), "--json")
    if args.what != "serve" and args.ckpt:
        raise UsageError(f"bench {args.what}: --ckpt is for bench serve; bench {args.what} builds random weights "
                         "with the layer dimensions of --config")
    if args.what == "serve":  # the engine builds its own backend; --url needs none
        from dsv3.bench import serve

        args.backend = args.backend or "auto"
        return serve.run_command(args)
    args.backend = args.backend or "cuda"
    try:
        backend = create_backend(args.backend, **({"device": args.device} if args.device else {}))
    except (ValueError, RuntimeError) as e:
        raise Dsv3Error(f"bench: cannot build backend {args.backend!r}: {e}") from e
    if args.what in ("decode", "prefill"):
        from dsv3.bench import model_steps

        return model_steps.run_command(args, backend)
    if args.what == "spec":
        from dsv3.bench import spec

        return spec.run_command(args, backend)
    if args.what == "profile":
        from dsv3.bench import kernel_profile

        return kernel_profile.run_command(args, backend)
    if backend.device.type == "cpu":
        raise Dsv3Error(f"bench: backend {args.backend!r} runs on the CPU; the benchmarks time an accelerator")
    names = ("gemm", "moe", "mla") if args.what == "all" else (args.what,)
    roofline = common.measure_roofline(backend)
    print(common.format_roofline(roofline), flush=True)
    records = []
    for name in names:
        module = _bench_module(name)
        if module is None:
            print(f"dsv3 bench {name}: dsv3/bench/{name}.py is not there yet; skipped", file=sys.stderr)
            continue
        options = {"kv_cache_dtype": args.kv_cache_dtype} if name == "mla" else {}
        records += module.run(backend, quick=args.quick, reference=not args.no_reference, **options)
    common.finish(records, roofline)
    print(common.format_table(records))
    if args.json:
        common.save_json(args.json, roofline, records,
                         {"backend": backend.capabilities.name, "ops": dict(backend.capabilities.ops)})
    return 0
