"""Options shared by the commands that load a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.checks import check_device, check_int
from dsv3.config import CONFIGS_DIR
from dsv3.errors import UsageError
from dsv3.precision import CHOICES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face checkpoint directory (default: the built-in tiny one)")
    p.add_argument("--config", metavar="YAML", help="with --random-weights: run a config (a YAML/JSON file or a "
                   "built-in name) on synthetic weights instead of a checkpoint")
    p.add_argument("--random-weights", action="store_true", help="confirm --config: build random weights of "
                   "that config's size (for DeepSeek-V3, 671B of them)")
    p.add_argument("--backend", default="auto", help="auto (default: picked from the hardware; DSV3_BACKEND "
                   "overrides), reference, cuda, rocm or ascend")
    p.add_argument("--precision", default="auto", choices=CHOICES,
                   help="auto (default): FP8 where the chip and checkpoint have it, else BF16")
    p.add_argument("--device", help="torch device for the backend (default: the backend's)")
    p.add_argument("--quiet", action="store_true", help="print no status lines on stderr")
    p.add_argument("--tp", type=int, help="under torchrun: ranks sharing attention, dense MLPs, embedding and "
                   "head (default: all)")
    p.add_argument("--ep", type=int, help="under torchrun: expert groups the routed experts are split into "
                   "(default: one per rank); see docs/parallel.md")


def check_model_arguments(args: argparse.Namespace) -> None:
    """What can be checked of the model options before anything is loaded; one UsageError naming the option."""
    if args.ckpt is not None and args.config is not None:
        raise UsageError("give either --ckpt (a checkpoint) or --config with --random-weights (synthetic "
                         "weights), not both")
    if args.config is not None and not args.random_weights:
        raise UsageError(f"--config {args.config} runs random weights; add --random-weights to do that, or give "
                         f"a checkpoint directory with --ckpt")
    if args.random_weights and args.config is None:
        raise UsageError("--random-weights needs --config (the model whose size to build)")
    if args.ckpt is not None:
        path = Path(args.ckpt)
        if not path.is_dir():
            hint = (f"; '{args.ckpt}' is a built-in config: --config {args.ckpt} --random-weights runs it on "
                    f"synthetic weights" if (CONFIGS_DIR / f"{args.ckpt}.yaml").exists() else "")
            raise UsageError(f"--ckpt {args.ckpt}: no such checkpoint directory{hint}")
        if not (path / "config.json").is_file():
            raise UsageError(f"--ckpt {args.ckpt}: not a checkpoint directory (no config.json)")
    check_int("--tp", args.tp, 1, optional=True)
    check_int("--ep", args.ep, 1, optional=True)
    check_device(args.device)


def load_from_args(args: argparse.Namespace):
    """The model and its engine from the model and engine flags (dsv3.serving.args.add_engine_arguments)."""
    from dsv3.serving.args import model_from_args

    return model_from_args(args)
