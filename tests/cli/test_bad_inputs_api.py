"""The Python API's bad inputs: a Dsv3Error subclass or a TypeError with a message, raised
before anything reaches torch; out of memory and backend failures come back as Dsv3Errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
import dsv3.engine_args
from dsv3.api import TINY_CHECKPOINT
from dsv3.config import load_config
from dsv3.errors import BackendSetupError, CheckpointError, ConfigError, Dsv3Error, OutOfMemoryError, UsageError
from dsv3.serving.params import SamplingParams
from dsv3.tokenizer import Tokenizer

SHARD = "model-00001-of-00001.safetensors"
LOAD = dict(backend="reference", precision="bf16", quiet=True, progress=False, max_model_len=64)


@pytest.fixture(scope="module")
def model():
    return dsv3.load_model(**LOAD)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(max_model_len="64"), UsageError, "max_model_len must be an integer, got str '64'"),
    (dict(max_num_seqs=0), UsageError, "max_num_seqs must be at least 1"),
    (dict(seed=1.5), UsageError, "seed must be an integer"),
    (dict(device="warp9"), UsageError, "^device warp9: not a torch device"),
    (dict(backend=3), TypeError, "backend must be a backend name or a Backend"),
    (dict(precision=None), TypeError, "precision must be a string"),
])
def test_load_model_argument_types(arguments, error, message):
    with pytest.raises(error, match=message):
        dsv3.load_model(**{**LOAD, **arguments})


def test_load_model_source_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="load_model takes a checkpoint directory"):
        dsv3.load_model(42, **LOAD)


def test_a_directory_without_config_is_not_taken_for_a_config_name(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        dsv3.load_model(tmp_path, **LOAD)


def test_backend_errors_are_dsv3_errors():
    with pytest.raises(BackendSetupError, match="unknown backend 'nope'") as error:
        dsv3.load_model(**{**LOAD, "backend": "nope"})
    assert isinstance(error.value, Dsv3Error)


def test_out_of_memory_while_loading_says_how_much_was_needed(monkeypatch):
    def transformer(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(dsv3.engine_args, "Transformer", transformer)
    with pytest.raises(OutOfMemoryError) as error:
        dsv3.load_model(**LOAD)
    message = str(error.value)
    assert "out of memory on cpu while loading the model: it needs about" in message
    assert "GB of bf16 weights" in message and "Tried to allocate 2.00 GiB" in message and "\n" not in message


def test_fp8_nan_bits_are_named(tmp_path):
    path = shutil.copytree(TINY_CHECKPOINT, tmp_path / "ckpt")
    tensors = load_file(str(path / SHARD))
    name = next(n for n, t in sorted(tensors.items()) if t.dtype == torch.float8_e4m3fn)
    bits = tensors[name].view(torch.uint8).clone()
    bits.view(-1)[7] = 0xFF  # e4m3fn NaN
    tensors[name] = bits.view(torch.float8_e4m3fn)
    save_file(tensors, str(path / SHARD), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} has NaN or Inf values"):
        dsv3.load_model(path, **LOAD)


def test_infinite_values_in_config_json_are_refused(tmp_path):
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    config["rope_scaling"]["beta_fast"] = float("inf")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'rope_scaling' must be finite, found inf"):
        load_config(tmp_path)


def test_logits_takes_a_plain_list_and_refuses_out_of_range_ids(model):
    logits = model.logits([[0, 5, 9]])
    assert logits.shape == (1, 3, model.config.vocab_size)
    with pytest.raises(UsageError, match="token id 512 is out of range for the vocabulary of 512 tokens"):
        model.logits([[0, 512]])
    with pytest.raises(UsageError, match="token id -1 is out of range"):
        model.logits(torch.tensor([[3, -1]]))
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model.logits(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="tokens must be a"):
        model.logits("hello")
    with pytest.raises(UsageError, match="equal length"):
        model.logits([[1, 2], [3]])


def test_generate_takes_a_str_as_one_prompt(model):
    outputs = model.generate("Hello from", SamplingParams(max_tokens=2))
    assert len(outputs) == 1


@pytest.mark.parametrize("params", [dict(temperature="hot"), dict(max_tokens=1.5), dict(top_p=float("nan")),
                                    dict(seed=2**64), dict(seed=-(2**63) - 1)])
def test_generate_sampling_types_are_named(model, params):
    with pytest.raises((Dsv3Error, TypeError)) as error:
        model.generate("Hello", SamplingParams(**params))
    assert str(error.value) and "Traceback" not in str(error.value)


def test_generate_token_lists_of_the_wrong_type(model):
    with pytest.raises((Dsv3Error, TypeError), match="."):
        model.generate([[1, "two", 3]])
    with pytest.raises(Dsv3Error, match="."):
        model.generate([[1, 10**6]])


def test_tokenizer_prompt_types():
    tokenizer = Tokenizer(TINY_CHECKPOINT)
    with pytest.raises(TypeError, match="a prompt must be a str, got bytes"):
        tokenizer.encode(b"hello")
    with pytest.raises(UsageError, match="not valid UTF-8"):
        tokenizer.encode("caf\udce9")


def test_a_fractional_top_k_in_generation_config_is_refused(tmp_path):
    from dsv3.errors import ConfigError
    from dsv3.serving.params import generation_defaults

    (tmp_path / "generation_config.json").write_text('{"top_k": 2.7}')
    with pytest.raises(ConfigError, match="generation_config.json: top_k must be an integer, found 2.7"):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"top_k": 40.0}')
    assert generation_defaults(tmp_path) == {"top_k": 40}
