"""Requests that try to freeze, starve or crash `dsv3 serve`: each gets a clear 4xx while /health keeps
answering within a second, and the server serves normally afterwards. One real server for the module."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import MAX_MODEL_LEN, HealthPoller, ServerProcess

from dsv3.api import TINY_CHECKPOINT

#: the tiny checkpoint's template, with switches a request turns on through chat_template_kwargs
SPIN = "{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
BOOM = "{% if boom %}{{ 1 / 0 }}{% endif %}"
MAX_REQUEST_BYTES = 8 << 20
RENDER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    tiny = json.loads((TINY_CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"]
    template.write_text(SPIN + BOOM + tiny)
    process = ServerProcess("--chat-template", str(template), "--chat-template-timeout", str(RENDER_TIMEOUT_S),
                            "--max-request-bytes", str(MAX_REQUEST_BYTES))
    yield process
    process.stop()


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60, **kwargs)


def chat(server, **fields) -> httpx.Response:
    return post(server, "chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                             **fields})


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status, error
    for word in words:
        assert word in error["message"], error


def assert_serves(server) -> None:
    assert chat(server).status_code == 200
    assert post(server, "completions", {"prompt": "hello", "max_tokens": 2}).status_code == 200


# ---- class 1: no blocking work on the event loop

def test_a_looping_chat_template_is_stopped_and_the_server_answers_meanwhile(server):
    with HealthPoller(server.url) as health:
        response = chat(server, chat_template_kwargs={"spin": True})
    assert_error(response, 400, "messages", "did not finish rendering", f"within {RENDER_TIMEOUT_S} s")
    assert health.polls >= 5 and not health.failures, health.failures
    assert_serves(server)  # the killed worker was replaced


def test_a_chat_template_that_raises_is_a_400(server):
    assert_error(chat(server, chat_template_kwargs={"boom": True}), 400, "messages", "ZeroDivisionError")


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server):
    with HealthPoller(server.url) as health:
        response = post(server, "completions", {"prompt": "the quick brown fox " * 200_000, "max_tokens": 2})
    assert_error(response, 400, "prompt", "4000000 characters", f"context is {MAX_MODEL_LEN} tokens")
    assert not health.failures, health.failures


def test_tokenizing_many_prompts_leaves_the_server_answering(server):
    prompts = ["the quick brown fox " * 700] * 200  # each might fit by its length alone; 2.8 MB to tokenize
    with HealthPoller(server.url) as health:
        response = post(server, "completions", {"prompt": prompts, "max_tokens": 2})
    assert_error(response, 400, "prompt", "shorten the prompt")
    assert health.polls >= 3 and not health.failures, health.failures
