"""A `vllm serve`-style command line starts `dsv3 serve`, and what vLLM users reach for beside the OpenAI routes:
/tokenize, /detokenize, /version, /ping, system_fingerprint, request logging, V3.1's thinking switch and tool
format, a queue cap that sheds load with 503, the abort metric of dropped streams, and a /health that fails
once the engine loop is dead."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ServerProcess

import dsv3
from dsv3.engine_args import TINY_CHECKPOINT
from dsv3.server.app import build_app
from dsv3.server.chat_template import ChatTemplate
from dsv3.server.handlers import ServerSettings

KEY = "vllm-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: DeepSeek-V3.1's generation prompt: `<think>` with thinking on, `</think>` (no reasoning) with it off
V31_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>"
                "{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 8}}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("v31") / "v31.jinja"
    template.write_text(V31_TEMPLATE)
    process = ServerProcess(
        str(TINY_CHECKPOINT), "--served-model-name", "tiny", "--dtype", "bfloat16", "--trust-remote-code",
        "--kv-cache-dtype", "fp8_e4m3", "--seed", "7", "--generation-config", "vllm", "--uvicorn-log-level", "info",
        "--reasoning-parser", "deepseek_v3", "--tool-call-parser", "deepseek_v31", "--enable-auto-tool-choice",
        "--chat-template", str(template), "--max-num-seqs", "2", "--max-waiting-requests", "2",
        env={"VLLM_API_KEY": KEY})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def samples(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {f"{s.name}[{s.labels.get('finished_reason', '')}]": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_small_routes_and_the_key_from_vllm_api_key(server, client):
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/version").json() == {"version": dsv3.__version__}
    assert httpx.get(f"{server.url}/ping").status_code == 200 and httpx.post(f"{server.url}/ping").status_code == 200
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert completion.system_fingerprint == f"dsv3-{dsv3.__version__}"
    tokenized = httpx.post(f"{server.url}/tokenize", headers=AUTH, json={"prompt": "Hello world"}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 512
    assert httpx.post(f"{server.url}/detokenize", headers=AUTH,
                      json={"tokens": tokenized["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(f"{server.url}/tokenize", headers=AUTH, json={
        "messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True}).json()
    assert len(chat["token_strs"]) == chat["count"]  # the vocabulary's own pieces, as vLLM returns them
    assert "<｜User｜>" in chat["token_strs"] and "<｜Assistant｜>" in chat["token_strs"]
    bad = httpx.post(f"{server.url}/detokenize", headers=AUTH, json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_request_log_lines_and_the_generation_config_switch(server, client):
    # --generation-config vllm: the tiny checkpoint's do_sample=false default is not applied, so requests sample
    texts = {client.completions.create(model="tiny", prompt="Tell me", max_tokens=16).choices[0].text
             for _ in range(2)}
    assert len(texts) == 2
    log = server.output()
    assert "request cmpl-" in log and "max_tokens=16" in log  # dsv3's one line per request
    assert '"POST /v1/completions HTTP/1.1" 200' in log  # uvicorn's access line at --uvicorn-log-level info


def test_v31_thinking_switch_and_tool_format(client):
    messages = [{"role": "user", "content": "Think about it"}]
    off = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"chat_template_kwargs": {"thinking": False}}).choices[0].message
    on = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                        extra_body={"chat_template_kwargs": {"thinking": True}}).choices[0].message
    assert off.content and getattr(off, "reasoning_content", None) is None
    assert on.reasoning_content and on.content is None  # the tiny model never closes its reasoning
    call = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=250,
                                          temperature=0, tool_choice="required").choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}


def test_a_burst_past_the_queue_cap_gets_503_and_the_server_stays_healthy(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "temperature": 0}

    def post(_):
        return httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.status_code == 200 for r in responses if r not in refused)
    assert refused[0].headers["retry-after"] == "1"
    error = refused[0].json()["error"]
    assert error["type"] == "ServiceUnavailableError" and "--max-waiting-requests" in error["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert post(0).status_code == 200


def test_a_dropped_stream_counts_as_aborted(server):
    before = samples(server).get("dsv3:request_success_total[abort]", 0)
    body = {"model": "tiny", "prompt": "Go on", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    for _ in range(100):
        if samples(server).get("dsv3:request_success_total[abort]", 0) == before + 1:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert samples(server)["dsv3:request_success_total[abort]"] == before + 1


def test_health_fails_once_the_engine_loop_dies():
    model = dsv3.load_model(TINY_CHECKPOINT, backend="reference", quiet=True, progress=False, max_model_len=128,
                            cache_tokens=2048, max_num_seqs=4)
    engine = model.async_engine

    def broken_stats():  # outside a step, where no request isolates the failure: the loop itself dies
        raise RuntimeError("injected loop fault")

    app = build_app(engine, ServerSettings("tiny", str(TINY_CHECKPOINT), ChatTemplate.load(TINY_CHECKPOINT)))

    async def drive():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            assert (await http.get("/health")).status_code == 200
            model.engine.stats = broken_stats
            failed = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            health = await http.get("/health")
            again = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        return failed, health, again

    try:
        failed, health, again = asyncio.run(drive())
    finally:
        engine.shutdown()
    assert failed.status_code == 500 and "injected loop fault" in failed.json()["error"]["message"]
    assert health.status_code == 503 and "engine loop died" in health.json()["error"]["message"]
    assert again.status_code == 500 and "shut down" in again.json()["error"]["message"]
