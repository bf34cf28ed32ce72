"""--load-format dummy (vLLM's name): random weights for a checkpoint directory's config, served with its
tokenizer, so a server of real dimensions can be benchmarked from config.json and tokenizer files alone."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dsv3.api import TINY_CHECKPOINT, load_model
from dsv3.errors import Dsv3Error
from dsv3.serving.params import SamplingParams

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture
def config_only(tmp_path):
    for name in FILES:
        shutil.copy(TINY_CHECKPOINT / name, tmp_path / name)
    return tmp_path


def test_dummy_weights_run_with_the_checkpoints_tokenizer(config_only):
    model = load_model(config_only, backend="reference", precision="bf16", load_format="dummy", quiet=True,
                       progress=False, max_model_len=64)
    [out] = model.generate("Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].text == model.tokenizer.decode(out.outputs[0].token_ids)
    again = load_model(TINY_CHECKPOINT, backend="reference", precision="bf16", quiet=True, progress=False,
                       max_model_len=64)
    trained = again.generate("Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert trained.outputs[0].token_ids != out.outputs[0].token_ids  # the weights really are not the checkpoint's


def test_without_dummy_a_directory_without_weights_is_an_error(config_only):
    with pytest.raises(Dsv3Error, match="no .*safetensors"):
        load_model(config_only, backend="reference", quiet=True, progress=False)
    with pytest.raises(Dsv3Error, match="load_format must be one of auto, dummy, got 'random'"):
        load_model(config_only, backend="reference", quiet=True, progress=False, load_format="random")


def test_the_flag_on_the_command_line(config_only):
    done = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--ckpt", str(config_only), "--load-format",
                           "dummy", "--backend", "reference", "--max-new-tokens", "3", "Hello"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cache:" in done.stderr and "Traceback" not in done.stderr
