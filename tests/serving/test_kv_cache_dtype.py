"""--kv-cache-dtype: the FP8 latent cache end to end on the tiny checkpoint, its sizing, and bad values.

On the fp32 precision path (these CPU tests) fp8 quantizes the latent exactly as on a GPU and keeps the rope
key in fp32 (784 bytes per token per layer at V3 dimensions instead of 656).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from serving_helpers import tiny

from dsv3.cli import main
from dsv3.commands.args import add_engine_arguments, engine_args
from dsv3.errors import UsageError

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Once upon a time, in a land far away,",
           "def fibonacci(n):", "1, 2, 3, 5, 8, 13,", "DeepSeek-V3 is a mixture-of-experts model"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_greedy_agreement_with_the_bf16_cache(precision):
    """At least 95% of the BF16-cache run's greedy tokens are the FP8-cache model's greedy choice given the
    same prefix. Counted step by step (teacher forcing, every prefix one request through the engine): in a
    free run the first different token changes every later one, which measures the tiny random model's
    chaos, not the cache. The free runs must still start alike."""
    base = tiny(precision=precision, kv_cache_dtype="bf16")
    prompts = [base.tokenizer.encode(text) for text in PROMPTS]
    expected = base.greedy_tokens(prompts, 32)
    base.shutdown()
    model = tiny(precision=precision, kv_cache_dtype="fp8")
    assert all(cache.dtype == torch.float8_e4m3fn for cache in model.transformer.caches)
    prefixes = [prompt + tokens[:i] for prompt, tokens in zip(prompts, expected, strict=True)
                for i in range(len(tokens))]
    wanted = [token for tokens in expected for token in tokens]
    got = [tokens[0] for tokens in model.greedy_tokens(prefixes, 1)]
    free = model.greedy_tokens(prompts, 32)
    model.shutdown()
    agreement = sum(a == b for a, b in zip(got, wanted, strict=True)) / len(wanted)
    assert len(wanted) >= 100 and agreement >= 0.95, f"{agreement:.1%} of {len(wanted)} tokens agree"
    assert sum(a[:3] == b[:3] for a, b in zip(free, expected, strict=True)) >= 4


def test_fp8_cache_holds_more_tokens_in_the_same_bytes():
    """The cache plan counts the FP8 bytes (the tiny model's 100 per token per layer against 160 in BF16; V3's
    656 against 1152, tests/kernels/test_mla_fp8_cache.py) and the startup line says which cache it is."""
    from dsv3.serving.cache_sizing import plan_cache

    dense_bytes, fp8_bytes = 160, 100
    bf16 = tiny(precision="bf16", cache_tokens=4096)
    fp8 = tiny(precision="bf16", cache_tokens=4096, kv_cache_dtype="fp8")
    layers = len(bf16.transformer.layers)
    assert bf16.transformer.cache_bytes_per_block(16) == 16 * dense_bytes * layers
    assert fp8.transformer.cache_bytes_per_block(16) == 16 * fp8_bytes * layers
    # the type is an argument: sizing an FP8 cache leaves the model's BF16 pools as they are
    assert bf16.transformer.cache_bytes_per_block(16, "fp8") == 16 * fp8_bytes * layers
    assert bf16.transformer.kv_cache_dtype == "auto" and bf16.transformer.caches[0].dtype == torch.bfloat16
    line = plan_cache(fp8.transformer, 16, 256, 4, 64, cache_tokens=4096).describe()
    assert line.endswith(f"; FP8 latent cache, {fp8_bytes} bytes per token per layer"), line
    assert plan_cache(bf16.transformer, 16, 256, 4, 64, cache_tokens=4096).describe().endswith("GiB)")
    bf16.shutdown()
    fp8.shutdown()


def test_flag_reaches_the_engine():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_args(parser.parse_args([])).kv_cache_dtype == "auto"
    assert engine_args(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    assert "--kv-cache-dtype" in parser.format_help()


def test_bad_value_is_one_line(capsys):
    assert main(["generate", "--kv-cache-dtype", "fp4", "--max-new-tokens", "1", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == "dsv3: error: --kv-cache-dtype must be one of auto, bf16, fp8, got 'fp4'\n", err
    with pytest.raises(UsageError, match="^kv_cache_dtype must be one of auto, bf16, fp8, got 'fp4'"):
        tiny(kv_cache_dtype="fp4")
