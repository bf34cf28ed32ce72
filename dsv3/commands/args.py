"""The flags of the commands that load a model (`dsv3 generate`, `dsv3 serve`, `dsv3 bench serve`), mapped onto
EngineArgs (dsv3.engine_args): the one file that names them.

Every EngineArgs field with cli=True is the flag `--field-name` (its older names too: --max-seq-len), with the
field's default, choices and help, so a new field needs nothing here. --ckpt, or --config with
--random-weights, says which model. A setting's error names its flag (FlagArgs.name), as vLLM's do.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dsv3.config import CONFIGS_DIR, load_config
from dsv3.engine_args import EngineArgs
from dsv3.errors import UsageError
from dsv3.llm import Model


def flag(field_name: str) -> str:
    """The flag of an EngineArgs field: max_model_len -> --max-model-len."""
    return "--" + field_name.replace("_", "-")


class FlagArgs(EngineArgs):
    """EngineArgs from the flags: its messages name a setting by its flag."""

    def name(self, field_name: str) -> str:
        return flag(field_name)


#: vLLM's --dtype values -> dsv3's precision (dsv3 has no float16 path)
DTYPES = {"auto": "auto", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
#: vLLM's --kv-cache-dtype names -> dsv3's
KV_CACHE_DTYPE_NAMES = {"fp8_e4m3": "fp8", "bfloat16": "bf16"}


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model options (--ckpt, --config, --random-weights and the EngineArgs of group "model": --backend,
    --precision, --device, --tp, --ep, --quiet) and, in their own group, the engine's (cache, scheduler, graphs)."""
    p.add_argument("--ckpt", metavar="DIR", help="Hugging Face checkpoint directory (default: the built-in tiny one)")
    p.add_argument("--dtype", choices=(*DTYPES, "half", "float16"), help="vLLM's name for the compute type: "
                   "bfloat16 is --precision bf16, float32 --precision fp32, auto leaves --precision (float16: "
                   "refused, dsv3 computes in FP8, BF16 or FP32)")
    p.add_argument("--trust-remote-code", action="store_true", help="accepted for vLLM's command lines; dsv3 "
                   "runs no code from a checkpoint, so there is nothing to trust")
    p.add_argument("--config", metavar="YAML", help="with --random-weights: run a config (a YAML/JSON file or a "
                   "built-in name) on synthetic weights instead of a checkpoint")
    p.add_argument("--random-weights", action="store_true", help="confirm --config: build random weights of "
                   "that config's size (for DeepSeek-V3, 671B of them)")
    groups = {"model": p, "engine": p.add_argument_group("engine")}
    for f in dataclasses.fields(EngineArgs):
        if f.metadata["cli"]:
            _add_field(groups[f.metadata["group"]], f, f.default)


def add_setting_arguments(p, field_names: list[str], **defaults) -> None:
    """The flags of these EngineArgs fields only, with other defaults where given: for a command that plans a
    layout instead of loading it (`dsv3 doctor --plan`)."""
    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    for name in field_names:
        _add_field(p, fields[name], defaults.get(name, fields[name].default))


def _add_field(p, f: dataclasses.Field, default) -> None:
    meta = f.metadata
    names = [flag(f.name), *([meta["short"]] if meta["short"] else []), *(flag(alias) for alias in meta["aliases"])]
    options: dict = dict(dest=f.name, default=default, help=meta["help"])
    if isinstance(f.default, bool):
        options["action"] = argparse.BooleanOptionalAction if default else "store_true"
    else:
        kind = str(f.type).split("|")[0].strip()
        options.update(type={"int": int, "float": float}.get(kind, str), metavar=meta["metavar"])
        if meta["metavar"] is None and meta["choices"] is not None:
            options["choices"] = meta["choices"]
        if f.default is not None:  # a field whose default is None says what None means in its help
            options["help"] += f" (default {default})"
    p.add_argument(*names, **options)


def check_model_arguments(args: argparse.Namespace) -> None:
    """--ckpt, --config and --random-weights, before anything is loaded; one UsageError naming the option."""
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


def engine_args(args: argparse.Namespace, **overrides) -> FlagArgs:
    """The settings the flags give, every one checked before anything loads; `overrides` replace some (bench
    serve passes its model and backend). A --config with a --layers attribute (bench serve) keeps only that
    many layers."""
    if hasattr(args, "random_weights"):
        check_model_arguments(args)
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)
                if f.metadata["cli"] and hasattr(args, f.name)}
    _vllm_names(args, settings)
    if "model" not in overrides:
        settings["model"] = args.ckpt or args.config
        if args.config and getattr(args, "layers", None):
            settings["model"] = load_config(args.config).replace(num_hidden_layers=args.layers)
    result = FlagArgs(**{**settings, **overrides})
    result.check()
    return result


def _vllm_names(args: argparse.Namespace, settings: dict) -> None:
    """vLLM's spellings of dsv3 settings: --dtype as --precision, --kv-cache-dtype fp8_e4m3 as fp8."""
    dtype = getattr(args, "dtype", None)
    if dtype in ("half", "float16"):
        raise UsageError(f"--dtype {dtype}: dsv3 computes in FP8, BF16 or FP32 (--dtype bfloat16 or float32), "
                         "not float16")
    if dtype not in (None, "auto"):
        if settings.get("precision", "auto") not in ("auto", DTYPES[dtype]):
            raise UsageError(f"--dtype {dtype} and --precision {settings['precision']} disagree: give one")
        settings["precision"] = DTYPES[dtype]
    kv = settings.get("kv_cache_dtype")
    if kv == "fp8_e5m2":
        raise UsageError("--kv-cache-dtype fp8_e5m2: dsv3's FP8 latent cache is e4m3 (fp8_e4m3, or fp8)")
    if kv in KV_CACHE_DTYPE_NAMES:
        settings["kv_cache_dtype"] = KV_CACHE_DTYPE_NAMES[kv]


def load_from_args(args: argparse.Namespace) -> Model:
    """The Model (with its engine) the flags describe, every flag checked before any weight is read."""
    return engine_args(args).build()
