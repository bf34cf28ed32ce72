"""The engine flags: parsed, checked before loading (one UsageError naming the flag), passed to the engine."""

from __future__ import annotations

import argparse

import pytest

from dsv3.errors import UsageError
from dsv3.serving.args import add_engine_arguments, check_engine_arguments, model_from_args


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    return p.parse_args(list(argv))


def test_flags_reach_the_engine():
    args = parse("--backend", "reference", "--precision", "fp32", "--quiet", "--max-model-len", "128",
                 "--block-size", "8", "--cache-tokens", "800", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
                 "--no-enable-prefix-caching", "--enforce-eager")
    model = model_from_args(args)
    c = model.engine.config
    assert (c.max_model_len, c.block_size, c.num_blocks, c.max_num_seqs, c.max_num_batched_tokens) == \
        (128, 8, 101, 4, 32)
    assert not c.enable_prefix_caching and c.enforce_eager and model.precision == "fp32"
    assert model.async_engine.max_model_len == 128


def test_older_names_are_aliases_and_prefix_caching_is_on_by_default():
    args = parse("--max-seq-len", "64", "--max-batch-size", "3")
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching) == (64, 3, True)


@pytest.mark.parametrize("argv, flag", [
    (("--block-size", "0"), "--block-size"),
    (("--gpu-memory-utilization", "0"), "--gpu-memory-utilization"),
    (("--gpu-memory-utilization", "nan"), "--gpu-memory-utilization"),
    (("--cache-tokens", "-5"), "--cache-tokens"),
    (("--max-num-seqs", "0"), "--max-num-seqs"),
    (("--max-num-batched-tokens", "8", "--max-num-seqs", "16"), "--max-num-batched-tokens"),
    (("--max-model-len", "1"), "--max-model-len"),
])
def test_bad_flags_are_named(argv, flag):
    with pytest.raises(UsageError, match=flag):
        check_engine_arguments(parse(*argv))
