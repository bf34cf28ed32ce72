"""`dsv3 serve` end to end: a real server process driven by the real `openai` client and raw httpx."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import API_KEY, MAX_MODEL_LEN, MAX_REQUEST_BYTES, ROOT, STARTUP_LIMIT_S, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = [f"Prompt number {i}: the quick brown fox" + " jumps" * (i % 5) for i in range(16)]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def model_name(client) -> str:
    return client.models.list().data[0].id


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def sse_events(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_starts_quickly_and_lists_the_model(server, client):
    assert server.startup_s < STARTUP_LIMIT_S, f"took {server.startup_s:.1f} s to answer /health"
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert httpx.head(f"{server.url}/health").status_code == 200


def test_a_taken_port_is_one_line_before_loading(server):
    result = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--port", str(server.port)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip() == f"dsv3: error: cannot listen on --host 127.0.0.1 --port {server.port}: " \
                                    "Address already in use"


def test_completion_stream_equals_the_whole_response(client):
    whole = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                      temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_stream_equals_the_whole_response(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and whole.usage.completion_tokens == whole.usage.total_tokens - \
        whole.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_framing_ends_with_done_and_a_usage_chunk(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 4
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def test_sixteen_concurrent_greedy_requests_give_their_solo_outputs(server, client):
    solo = [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in PROMPTS]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as async_client:
            responses = await asyncio.gather(*(async_client.completions.create(
                model="tiny", prompt=p, max_tokens=16, temperature=0) for p in PROMPTS))
        return [r.choices[0].text for r in responses]

    assert asyncio.run(together()) == solo


def test_stop_strings_end_the_text_before_them(client):
    text = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = text[6:9]
    assert stop.strip(), text
    stopped = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_generate_chat_renders_the_same_prompt_as_the_server(client):
    """`dsv3 generate --chat` and /v1/chat/completions go through one template: same greedy answer."""
    question = "What is dsv3?"
    served = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                            max_tokens=20, temperature=0).choices[0].message.content
    result = subprocess.run([sys.executable, "-m", "dsv3", "generate", "--chat", question, "--max-new-tokens", "20",
                             "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == served + "\n"


def test_n_choices_stream_like_the_whole_response_and_end_once(client):
    args = dict(model="tiny", max_tokens=6, n=3, temperature=1.0, seed=5)
    whole = client.completions.create(prompt="Several endings:", **args)
    chunks = list(client.completions.create(prompt="Several endings:", stream=True, **args))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    messages = [{"role": "user", "content": "Pick a word"}]
    whole = client.chat.completions.create(messages=messages, **args)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **args))
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]


def test_n_logprobs_and_echo(client):
    response = client.completions.create(model="tiny", prompt=["a b c", "d e f"], max_tokens=3, n=2,
                                         temperature=1.0, seed=1, logprobs=2)
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 12
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)
    echoed = client.completions.create(model="tiny", prompt="echo me", max_tokens=2, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith("echo me")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_tools_are_rendered_and_plain_output_stays_content(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                              tools=tools, max_tokens=6, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert error.value.body["param"] == "tool_choice"


def test_a_disconnect_mid_stream_frees_the_request_at_once(server):
    idle = metrics(server)["dsv3:kv_cache_usage_perc"]
    body = {"model": "tiny", "prompt": "A long story:", "max_tokens": MAX_MODEL_LEN - 16, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = sse_events_lazy(r)
        for _ in range(3):
            next(events)
        busy = metrics(server)
        assert busy["dsv3:num_requests_running"] == 1 and busy["dsv3:kv_cache_usage_perc"] > idle
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = metrics(server)
        if after["dsv3:num_requests_running"] == 0 and after["dsv3:kv_cache_usage_perc"] == idle:
            break
        time.sleep(0.05)
    assert after["dsv3:num_requests_running"] == 0 and after["dsv3:kv_cache_usage_perc"] == idle
    assert after["dsv3:generation_tokens_total"] < busy["dsv3:generation_tokens_total"] + MAX_MODEL_LEN // 2


def test_metrics_parse_and_name_vllms_metrics(server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text  # no key needed
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dsv3:num_requests_running", "dsv3:num_requests_waiting", "dsv3:kv_cache_usage_perc",
                 "dsv3:prefix_cache_queries", "dsv3:prefix_cache_hits", "dsv3:prompt_tokens",
                 "dsv3:generation_tokens", "dsv3:num_preemptions", "dsv3:time_to_first_token_seconds",
                 "dsv3:inter_token_latency_seconds", "dsv3:e2e_request_latency_seconds"):
        assert name in families, name
    samples = metrics(server)
    assert samples["dsv3:generation_tokens_total"] >= 2 and samples["dsv3:e2e_request_latency_seconds_count"] >= 1
    assert samples["dsv3:time_to_first_token_seconds_count"] >= 1


LONG_PROMPT = "word " * (MAX_MODEL_LEN + 50)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "hi"}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": MAX_MODEL_LEN * 4}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": MAX_MODEL_LEN * 4}, 400, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": "two"}, 400, "n"),
    ("/v1/completions", {**COMPLETION, "prompt": LONG_PROMPT}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2], [100000]]}, 400, "prompt"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * (MAX_REQUEST_BYTES + 1)}, 413, None),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["message"] and error["param"] == param, error


def test_the_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model="tiny", prompt="still up", max_tokens=1).choices  # the server goes on


@pytest.mark.parametrize("route", ["/v1/models", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_v1_needs_the_api_key(server, route, headers):
    method = httpx.get if route == "/v1/models" else lambda url, **kw: httpx.post(url, json=COMPLETION, **kw)
    response = method(f"{server.url}{route}", headers=headers, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == 401


def test_r1_reasoning_server_and_sigterm_finishing_in_flight_requests_with_exit_0(client):
    """A second server, with the R1 reasoning parser and its key from DSV3_API_KEY: the tiny model never
    writes </think>, so what the shared server returns as content comes back as reasoning_content. Then
    SIGTERM mid-stream: the stream still completes, the server exits 0 and stops listening."""
    messages = [{"role": "user", "content": "Think about it"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    process = ServerProcess("--reasoning-parser", "deepseek-r1", "--shutdown-timeout", "20", api_key_env="env-key")
    try:
        assert httpx.get(f"{process.url}/v1/models").status_code == 401  # the key from DSV3_API_KEY
        r1 = openai.OpenAI(base_url=f"{process.url}/v1", api_key="env-key", max_retries=0, timeout=60)
        message = r1.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                             temperature=0).choices[0].message
        assert message.reasoning_content == plain.choices[0].message.content and message.content is None
        chunks = list(r1.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
        assert not any(d.content for d in deltas)

        body = {"prompt": "last words", "max_tokens": 64, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer env-key"}) as r:
            events = sse_events_lazy(r)
            first = next(events)
            process.process.send_signal(15)
            rest = list(events)
        assert json.loads(first)["choices"] and rest[-1] == "[DONE]"
        assert process.process.wait(30) == 0, process.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{process.url}/health", timeout=2)
    finally:
        process.stop()


def sse_events_lazy(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def test_a_streamed_request_the_engine_refuses_is_a_400_with_the_engines_message(server):
    """The engine owns the request checks (LLMEngine.check_request): the server asks it before a stream's 200
    goes out, and answers with the message a Python caller of the engine gets."""
    body = {**COMPLETION, "prompt": [5, 6, 7], "max_tokens": MAX_MODEL_LEN, "stream": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_tokens"
    assert error["message"] == (f"this model's context is {MAX_MODEL_LEN} tokens, but {MAX_MODEL_LEN + 3} were "
                                f"requested (3 in the prompt, {MAX_MODEL_LEN} to generate): lower max_tokens to at "
                                f"most {MAX_MODEL_LEN - 3}")
