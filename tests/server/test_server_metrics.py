"""The metrics text parses with prometheus-client's parser and carries the engine's numbers; request models
check ranges and map onto SamplingParams fields."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from dsv3.server.metrics import ServerMetrics
from dsv3.server.protocol import ChatCompletionRequest, CompletionRequest, sampling_kwargs


def scrape(metrics: ServerMetrics) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            key = sample.name + "".join(f"[{v}]" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[key] = sample.value
    return samples


def test_engine_stats_and_request_latencies_are_exported():
    stats = SimpleNamespace(num_running=3, num_waiting=1, cache_usage=0.25, prefix_queries=100, prefix_hits=40,
                            prompt_tokens=120, generation_tokens=64, num_preemptions=2)
    metrics = ServerMetrics(lambda: stats, "tiny")
    timer = metrics.timer()
    for total in (1, 2, 4):
        timer.tokens(total)
    timer.finish("length")
    samples = scrape(metrics)
    assert samples["dsv3:num_requests_running"] == 3 and samples["dsv3:num_requests_waiting"] == 1
    assert samples["dsv3:kv_cache_usage_perc"] == 0.25
    assert samples["dsv3:prefix_cache_queries_total"] == 100 and samples["dsv3:prefix_cache_hits_total"] == 40
    assert samples["dsv3:prompt_tokens_total"] == 120 and samples["dsv3:generation_tokens_total"] == 64
    assert samples["dsv3:num_preemptions_total"] == 2
    assert samples["dsv3:time_to_first_token_seconds_count"] == 1
    assert samples["dsv3:inter_token_latency_seconds_count"] == 3
    assert samples["dsv3:e2e_request_latency_seconds_count"] == 1
    assert samples["dsv3:request_success_total[length]"] == 1


def test_requests_map_onto_sampling_params_fields():
    request = CompletionRequest(prompt="x", temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, stop="END", seed=7,
                                presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
                                ignore_eos=True, n=2)
    kwargs = sampling_kwargs(request, max_tokens=12, logprobs=3)
    assert kwargs == dict(n=2, max_tokens=12, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=7, stop=["END"],
                          stop_token_ids=None, ignore_eos=True, logprobs=3, repetition_penalty=1.1,
                          skip_special_tokens=True, presence_penalty=0.5, frequency_penalty=-0.5,
                          prompt_logprobs=None)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                 max_completion_tokens=7, logprobs=True, top_logprobs=2)
    assert chat.requested_max_tokens == 7 and chat.logprobs_count == 2
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).logprobs_count is None


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"), ({"n": 0}, "n"), ({"stop": [""]}, "stop"),
    ({"temperature": "hot"}, "temperature"), ({"logprobs": 21}, "logprobs"), ({"prompt": []}, "prompt"),
])
def test_out_of_range_fields_name_the_field(fields, param):
    with pytest.raises(ValidationError) as error:
        CompletionRequest(**{"prompt": "x", **fields})
    assert error.value.errors()[0]["loc"][0] == param


def test_chat_content_parts_are_joined_for_the_template():
    request = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert [m.template_dict() for m in request.messages] == [{"role": "system", "content": "sys"},
                                                           {"role": "user", "content": "ab"}]
