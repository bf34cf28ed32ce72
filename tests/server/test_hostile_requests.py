"""Requests that try to freeze, starve or crash `dsv3 serve`: each gets a clear 4xx while /health keeps
answering within a second, and the server serves normally afterwards. One real server for the module."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import MAX_MODEL_LEN, HealthPoller, ServerProcess, free_port

from dsv3.api import TINY_CHECKPOINT

#: the tiny checkpoint's template, with switches a request turns on through chat_template_kwargs
SPIN = "{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
BOOM = "{% if boom %}{{ 1 / 0 }}{% endif %}"
MAX_REQUEST_BYTES = 8 << 20
RENDER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
#: the key the server is given, with the trailing newline a key file leaves; clients send it without
API_KEY = "secret-key\n"
AUTH = {"Authorization": "Bearer secret-key"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    tiny = json.loads((TINY_CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"]
    template.write_text(SPIN + BOOM + tiny)
    process = ServerProcess("--chat-template", str(template), "--chat-template-timeout", str(RENDER_TIMEOUT_S),
                            "--max-request-bytes", str(MAX_REQUEST_BYTES), "--request-body-timeout",
                            str(BODY_TIMEOUT_S), "--api-key", API_KEY, "--max-tokens-per-request", "20000")
    yield process
    process.stop()


def post(server, path: str, body, **kwargs) -> httpx.Response:
    """POST a body: an object sent as JSON, or bytes as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/{path}", content=content, headers=headers, timeout=60, **kwargs)


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


# ---- class 5: client input is a 400 naming the field (or a defined result), never a 500

@pytest.mark.parametrize("path, body, param, words", [
    ("completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", ["prompt: a lone UTF-16 surrogate"]),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages",
     ["messages.0.content", "surrogate"]),
    ("completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", None, ["not valid JSON", "digits"]),
    ("completions", b'{"prompt": "hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, ["nested too deeply"]),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                     "chat_template_kwargs": {"x": json.loads("[" * 500 + "]" * 500)}}).encode(),
     "chat_template_kwargs", ["nested more than 100 levels"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs", ["may not set 'messages'"]),
    ("completions", {"prompt": "hi", "seed": 2**64}, "seed", ["seed must be in"]),
    ("completions", {"prompt": "hi", "max_tokens": True}, "max_tokens", ["not true"]),
    ("completions", {"prompt": [True, False]}, "prompt", ["prompt must be"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": False}, "temperature",
     ["not false"]),
])
def test_bad_input_is_a_400_naming_the_field(server, path, body, param, words):
    assert_error(post(server, path, body), 400, param, *words)


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_penalty_beyond_float_range_gives_a_defined_result(server, logprobs):
    """repetition_penalty 1e-45 is 0 in float32: logits / 0 were NaN, sampled from or sent back as logprobs."""
    response = post(server, "completions", {"prompt": "hello hello", "max_tokens": 3, "temperature": 1.0,
                                            "repetition_penalty": 1e-45, "logprobs": logprobs})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if logprobs:
        assert all(-10000 < lp <= 0 for lp in choice["logprobs"]["token_logprobs"]), choice["logprobs"]


def test_a_stalled_upload_is_a_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer secret-key"
                           b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        answer = b""
        while piece := connection.recv(4096):
            answer += piece
            if b"}}" in answer:
                break
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "stalled: nothing arrived for 2 s" in answer


def test_the_api_key_is_compared_without_surrounding_whitespace(server):
    assert chat(server).status_code == 200  # the server was given the key with a trailing newline
    assert post(server, "completions", {"prompt": "hi"}, headers={"Authorization": "Bearer other"}).status_code == 401


# ---- class 3: web pages cannot post to or read from a loopback server

def test_a_body_that_is_not_declared_json_is_a_415(server):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
        response = post(server, "completions", {"prompt": "hi", "max_tokens": 1}, headers=headers)
        assert_error(response, 415, None, "must be sent as Content-Type: application/json")


def test_a_loopback_server_answers_only_loopback_host_names(server):
    for host in ("evil.example", f"evil.example:{server.port}", "10.0.0.1"):
        response = httpx.get(f"{server.url}/health", headers={"Host": host})
        assert_error(response, 400, None, "Host header", "--allowed-hosts")
        response = post(server, "completions", {"prompt": "hi", "max_tokens": 1}, headers={"Host": host})
        assert response.status_code == 400
    for host in (f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200


def test_no_cors_headers_without_allowed_origins(server):
    preflight = httpx.options(f"{server.url}/v1/completions", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = post(server, "completions", {"prompt": "hi", "max_tokens": 1}, headers={"Origin": "http://page.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# ---- class 2: one request cannot starve the rest

def test_a_request_may_not_ask_for_too_many_sequences_or_tokens(server):
    response = post(server, "completions", {"prompt": ["a"] * 40, "n": 8, "max_tokens": 1})
    assert_error(response, 400, "n", "320 sequences (40 prompts x n=8)", "--max-seqs-per-request")
    response = post(server, "completions", {"prompt": ["a"] * 300, "max_tokens": 1})
    assert_error(response, 400, "prompt", "300 sequences")
    response = post(server, "completions", {"prompt": ["a b c"] * 100, "n": 2, "max_tokens": 400})
    assert_error(response, 400, "max_tokens", "may take 80800 tokens", "limit per request is 20000")


def test_a_request_with_many_sequences_does_not_hold_back_a_small_one(server):
    """The server runs 16 sequences at once; a request of 128 (16 prompts x n=8) used to take every slot
    until nearly all of its own were done, while a 2-token request waited behind them."""
    big = {"prompt": [f"prompt {i}" for i in range(16)], "n": 8, "max_tokens": 48, "ignore_eos": True,
           "stream": True}
    finishes, started, stop = [], threading.Event(), threading.Event()

    def read_big():
        with httpx.stream("POST", f"{server.url}/v1/completions", json=big, headers=AUTH, timeout=120) as response:
            for line in response.iter_lines():
                started.set()
                finishes.extend([time.monotonic()] * line.count('"finish_reason":"length"'))
                if stop.is_set():
                    return  # leaving the stream aborts the rest of the big request

    reader = threading.Thread(target=read_big)
    reader.start()
    try:
        assert started.wait(60)
        assert post(server, "completions", {"prompt": "hello", "max_tokens": 2}).status_code == 200
        small_done = time.monotonic()
    finally:
        stop.set()
        reader.join()
    assert sum(t < small_done for t in finishes) < 16, "the small request waited for the big one's sequences"


def test_a_template_looping_on_a_plain_conversation_stops_the_start_in_one_line(tmp_path):
    """serve checks the template's special tokens by rendering a plain conversation before the weights load;
    a template that loops there is refused within --chat-template-timeout instead of hanging the start."""
    template = tmp_path / "loop.jinja"
    template.write_text(SPIN.replace("{% if spin %}", "").replace("{% endif %}", ""))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--port", str(free_port()), "--chat-template",
                             str(template), "--chat-template-timeout", "1"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"dsv3: error: {template}: the chat template did not render a plain four-message conversation within 1 s "
        "(a loop?); fix it or pass another with --chat-template FILE")
    assert time.monotonic() - start < 60
