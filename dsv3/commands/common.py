"""Options shared by the commands that load a model."""

from __future__ import annotations

import argparse

from dsv3.precision import CHOICES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face checkpoint directory (default: the built-in tiny one)")
    p.add_argument("--config", metavar="YAML", help="run a config with synthetic weights instead of a checkpoint")
    p.add_argument("--backend", default="auto", help="auto (default: picked from the hardware; DSV3_BACKEND "
                   "overrides), reference, cuda, rocm or ascend")
    p.add_argument("--precision", default="auto", choices=CHOICES,
                   help="auto (default): FP8 where the chip and checkpoint have it, else BF16")
    p.add_argument("--device", help="torch device for the backend (default: the backend's)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences in the cache (default 8)")
    p.add_argument("--max-seq-len", type=int, help="tokens per sequence in the cache "
                   "(default: min(4096, the model's max_position_embeddings))")
    p.add_argument("--quiet", action="store_true", help="print no status lines on stderr")
    p.add_argument("--tp", type=int, help="under torchrun: ranks sharing attention, dense MLPs, embedding and "
                   "head (default: all)")
    p.add_argument("--ep", type=int, help="under torchrun: expert groups the routed experts are split into "
                   "(default: one per rank); see docs/parallel.md")


def load_from_args(args: argparse.Namespace):
    from dsv3.api import load_model

    source = args.ckpt or args.config
    return load_model(source, backend=args.backend, precision=args.precision, device=args.device,
                      max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, quiet=args.quiet,
                      tp=args.tp, ep=args.ep)
