"""SamplingParams: validation names the field; defaults come from generation_config.json."""

from __future__ import annotations

import json
import math
import re

import pytest

from dsv3.errors import ConfigError, Dsv3Error, RequestError
from dsv3.serving.params import MIN_TEMPERATURE, SamplingParams, generation_defaults


@pytest.mark.parametrize("options, param", [
    (dict(n=0), "n"), (dict(n=1.5), "n"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens="3"), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(seed=1.0), "seed"), (dict(stop=[1]), "stop"),
    (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs"),
])
def test_bad_values_name_the_field(options, param):
    with pytest.raises(RequestError) as error:
        SamplingParams(**options)
    assert error.value.param == param
    assert isinstance(error.value, Dsv3Error) and param in str(error.value) and "\n" not in str(error.value)


def test_defaults_resolve_from_the_checkpoint_then_neutral():
    params = SamplingParams(top_k=5).resolved({"temperature": 0.6, "top_p": 0.95, "top_k": 40})
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == \
        (0.6, 0.95, 5, 0.0, 1.0)
    neutral = SamplingParams().resolved({})
    assert (neutral.temperature, neutral.top_p, neutral.top_k) == (1.0, 1.0, 0)
    assert SamplingParams(temperature=0.0).resolved({"temperature": 0.6}).greedy


def test_a_tiny_temperature_is_raised_and_a_single_stop_string_becomes_a_list():
    assert SamplingParams(temperature=1e-9).resolved().temperature == MIN_TEMPERATURE
    assert SamplingParams(stop="END").stop == ["END"]


def test_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert generation_defaults(tmp_path) == {"temperature": 0.0}
    assert generation_defaults(tmp_path / "missing") == {}


@pytest.mark.parametrize("text, message", [
    ("{not json", "not readable JSON"),
    ("[0.6]", "expected a JSON object, found list"),
    ('{"temperature": NaN}', "temperature must be a finite number, found nan"),
    ('{"top_p": "high"}', "top_p must be a finite number, found 'high'"),
    ('{"top_p": 7}', "top_p"),
])
def test_a_broken_generation_config_is_named_not_dropped(tmp_path, text, message):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match="generation_config.json: .*" + re.escape(message)):
        generation_defaults(tmp_path)
