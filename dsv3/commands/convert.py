"""`dsv3 convert`: an FP8 checkpoint to BF16, or to e4m3fnuz for MI300X owners who want files.

dsv3 itself needs neither: it dequantizes or converts FP8 weights while loading.
"""

from __future__ import annotations

import argparse
import math
import sys

from dsv3.convert import TARGETS, convert_checkpoint
from dsv3.errors import Dsv3Error


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="FP8 checkpoint directory (Hugging Face layout)")
    p.add_argument("output", help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--to", default="bf16", choices=TARGETS,
                   help="bf16 (default): dequantized weights, no quantization_config; "
                        "e4m3fnuz: MI300X FP8 bits with doubled scales")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT, a checkpoint directory, once the new "
                   "checkpoint is complete (the old one is renamed aside, then deleted)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="size of the output shards in GB (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or status line")


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.max_shard_size) and args.max_shard_size * 1e9 >= 1):
        raise Dsv3Error(f"--max-shard-size must be a positive number of GB, got {args.max_shard_size}")
    out = convert_checkpoint(args.source, args.output, to=args.to, overwrite=args.overwrite,
                             max_shard_bytes=int(args.max_shard_size * 1e9), progress=not args.quiet)
    if not args.quiet:
        print(f"dsv3: wrote the {args.to} checkpoint to {out}", file=sys.stderr)
    return 0
