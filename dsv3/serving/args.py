"""The engine's command-line flags and building a model with its engine from them.

Used by `dsv3 generate`, `dsv3 serve` and `dsv3 bench serve`; flags named as vLLM names them.
"""

from __future__ import annotations

import argparse

from dsv3.backends.interface import KV_CACHE_DTYPES
from dsv3.checks import check_int, check_number
from dsv3.errors import UsageError
from dsv3.serving.spec_decode import SpeculativeConfig

DEFAULT_BLOCK_SIZE = 64
DEFAULT_MAX_NUM_SEQS = 128
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
LOAD_FORMATS = ("auto", "dummy")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model options (--ckpt, --config, --backend, --precision, --device, --tp, --ep, ...) and the
    engine's (cache, scheduler, graphs)."""
    from dsv3.commands.common import add_model_arguments

    add_model_arguments(p)
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", "--max-seq-len", dest="max_model_len", type=int,
                   help="the longest sequence, prompt and output (default: min(4096, the model's "
                   "max_position_embeddings))")
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"tokens per cache block (default {DEFAULT_BLOCK_SIZE})")
    g.add_argument("--kv-cache-dtype", default="auto", metavar="{" + ",".join(KV_CACHE_DTYPES) + "}",
                   help="the latent cache's type: auto (the activation dtype, default), bf16, or fp8: the latent "
                   "in FP8 with a float32 scale per 128 values and the rope key in BF16, 656 instead of 1152 bytes "
                   "per token per layer, so the same memory holds about 1.75x the tokens (cuda, rocm, reference; "
                   "ascend keeps BF16 and says so)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the accelerator's memory for weights, activations and cache (default 0.9)")
    g.add_argument("--cache-tokens", type=int, help="cache size in tokens instead of from memory (default on "
                   "the CPU: 65536, less where memory is short)")
    g.add_argument("--max-num-seqs", "--max-batch-size", dest="max_num_seqs", type=int,
                   default=DEFAULT_MAX_NUM_SEQS, help=f"sequences running at once (default {DEFAULT_MAX_NUM_SEQS})")
    g.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   help=f"tokens per engine step; longer prompts are prefilled in chunks (default "
                   f"{DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cache of equal prompt prefixes (default on)")
    g.add_argument("--enforce-eager", action="store_true", help="never replay recorded decode steps (CUDA graphs)")
    g.add_argument("--speculative-config", metavar="JSON",
                   help='speculative decoding with the checkpoint\'s MTP module, as vLLM takes it: '
                   '\'{"method": "mtp", "num_speculative_tokens": 1}\' ("deepseek_mtp" too; k > 1 applies the one '
                   'module recurrently; "disable_by_batch_size": N drafts only while at most N sequences run)')
    g.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="auto: the checkpoint's safetensors; dummy: random weights of the checkpoint's config, "
                   "with its tokenizer (for benchmarks: a directory with config.json and tokenizer files is "
                   "enough)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    """The engine flags, before anything loads: one UsageError naming the flag."""
    check_int("--max-model-len", getattr(args, "max_model_len", None), 2, optional=True)
    check_int("--block-size", args.block_size, 1)
    kv_cache_dtype = getattr(args, "kv_cache_dtype", "auto")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UsageError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    check_number("--gpu-memory-utilization", args.gpu_memory_utilization, 0.0, 1.0, low_open=True)
    check_int("--cache-tokens", args.cache_tokens, 1, optional=True)
    check_int("--max-num-seqs", args.max_num_seqs, 1)
    check_int("--max-num-batched-tokens", args.max_num_batched_tokens, 1)
    SpeculativeConfig.parse(getattr(args, "speculative_config", None))
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise UsageError(f"--max-num-batched-tokens {args.max_num_batched_tokens} is below --max-num-seqs "
                         f"{args.max_num_seqs}: a step could not decode every running sequence")


def engine_options(args: argparse.Namespace) -> dict:
    """load_model's engine keyword arguments from the flags."""
    return dict(max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                gpu_memory_utilization=args.gpu_memory_utilization, cache_tokens=args.cache_tokens,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                load_format=getattr(args, "load_format", "auto"),
                speculative_config=getattr(args, "speculative_config", None))


def model_from_args(args: argparse.Namespace):
    """The Model (with its engine) the flags describe, every flag checked before any weight is read.

    A --config with a --layers attribute (bench serve) keeps only that many layers.
    """
    from dsv3.api import load_model
    from dsv3.commands.common import check_model_arguments
    from dsv3.config import load_config

    if hasattr(args, "random_weights"):
        check_model_arguments(args)
    check_engine_arguments(args)
    source = args.ckpt or args.config
    layers = getattr(args, "layers", None)
    if args.config and layers:
        source = load_config(args.config).replace(num_hidden_layers=layers)
    return load_model(source, backend=args.backend, precision=args.precision, device=args.device,
                      quiet=args.quiet, tp=args.tp, ep=args.ep, **engine_options(args))
