"""EngineArgs and the engine flags: parsed, checked before loading (one UsageError naming the keyword for a
Python caller, the flag for a command), passed to the engine."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import dsv3
from dsv3.cli import main
from dsv3.commands.args import add_engine_arguments, engine_args, flag, load_from_args
from dsv3.engine_args import EngineArgs
from dsv3.errors import UsageError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    return p.parse_args(list(argv))


def test_flags_reach_the_engine():
    args = parse("--backend", "reference", "--precision", "fp32", "--quiet", "--max-model-len", "128",
                 "--block-size", "8", "--cache-tokens", "800", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
                 "--no-enable-prefix-caching", "--enforce-eager")
    model = load_from_args(args)
    c = model.engine.config
    assert (c.max_model_len, c.block_size, c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens) == \
        (128, 8, 101, 4, 32)
    assert not c.enable_prefix_caching and c.enforce_eager and model.precision == "fp32"
    assert model.async_engine.max_model_len == 128
    model.shutdown()


def test_older_names_are_aliases_and_prefix_caching_is_on_by_default():
    args = parse("--max-seq-len", "64", "--max-batch-size", "3")
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching) == (64, 3, True)
    settings = EngineArgs.from_keywords(path_or_config="tiny", max_seq_len=64, max_batch_size=3)
    assert (settings.model, settings.max_model_len, settings.max_num_seqs) == ("tiny", 64, 3)
    with pytest.raises(UsageError, match="give max_num_seqs or its older name max_batch_size, not both"):
        EngineArgs.from_keywords(max_num_seqs=4, max_batch_size=3)


def test_every_cli_setting_has_its_flag_with_the_fields_default():
    """A new EngineArgs field is a flag with nothing else to write; the defaults are the fields'."""
    defaults = parse()
    for f in dataclasses.fields(EngineArgs):
        assert (f.metadata["cli"] and getattr(defaults, f.name) == f.default) or \
            (not f.metadata["cli"] and not hasattr(defaults, f.name)), f.name


def test_an_unknown_keyword_is_a_type_error_with_the_closest_name():
    with pytest.raises(TypeError, match="unknown setting 'max_model_length' \\(did you mean 'max_model_len'\\?\\)"):
        dsv3.load_model(max_model_length=64)


@pytest.mark.parametrize("field, value, argv", [
    ("block_size", 0, ("--block-size", "0")),
    ("gpu_memory_utilization", 0.0, ("--gpu-memory-utilization", "0")),
    ("gpu_memory_utilization", float("nan"), ("--gpu-memory-utilization", "nan")),
    ("cache_tokens", -5, ("--cache-tokens", "-5")),
    ("max_num_seqs", 0, ("--max-num-seqs", "0")),
    ("max_model_len", 1, ("--max-model-len", "1")),
    ("kv_cache_dtype", "fp4", ("--kv-cache-dtype", "fp4")),
    ("tensor_parallel_size", 0, ("--tp", "0")),
])
def test_bad_settings_are_named_as_the_caller_named_them(field, value, argv):
    with pytest.raises(UsageError, match=f"^{flag(field)} "):
        engine_args(parse(*argv))
    with pytest.raises(UsageError, match=f"^{field} ") as error:
        dsv3.load_model(**{field: value})
    assert "--" not in str(error.value)


def test_a_combination_is_named_both_ways():
    with pytest.raises(UsageError, match="^--max-num-batched-tokens 8 is below --max-num-seqs 16"):
        engine_args(parse("--max-num-batched-tokens", "8", "--max-num-seqs", "16"))
    with pytest.raises(UsageError, match="^max_num_batched_tokens 8 is below max_num_seqs 16"):
        dsv3.load_model(max_num_batched_tokens=8, max_num_seqs=16)


def test_a_load_time_error_names_the_flag_under_the_command(capsys):
    """Checks that need the loaded model (the cache sizing) name the flag too."""
    assert main(["generate", "--backend", "reference", "--quiet", "--cache-tokens", "64", "--max-model-len", "256",
                 "--max-new-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: cache: ") and err.endswith("raise --cache-tokens or lower --max-model-len\n")


def test_the_engine_package_knows_nothing_of_the_command_line_or_the_api():
    """dsv3/serving/ sits below EngineArgs: no argparse, no import of dsv3.commands, dsv3.api, dsv3.engine_args
    or dsv3.llm, and no dsv3 import inside a function (where a cycle would hide)."""
    import ast
    from pathlib import Path

    import dsv3.serving

    above = ("argparse", "dsv3.commands", "dsv3.api", "dsv3.engine_args", "dsv3.llm")
    for path in sorted(Path(dsv3.serving.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n == a or n.startswith(a + ".") for n in names for a in above), (path.name, names)
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsv3"):
                    raise AssertionError(f"{path.name}: {node.module} imported inside {function.name}")
