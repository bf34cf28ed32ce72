"""SIGTERM with requests in flight: each ends explicitly within --shutdown-timeout (a stream with a final
chunk per open choice, finish_reason "abort", an error event and [DONE]; a plain request a 503), and the
server exits 0. The same server first checks --allowed-hosts and --allowed-origins."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import MAX_MODEL_LEN, ServerProcess

from dsv3.api import TINY_CHECKPOINT

SHUTDOWN_TIMEOUT_S = 2
SPIN = "{% if spin %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
JSON = {"Content-Type": "application/json"}
LONG = {"max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(SPIN + json.loads((TINY_CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"])
    process = ServerProcess("--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--allowed-hosts", "127.0.0.1,myhost.test",
                            "--allowed-origins", '["http://app.test"]', "--chat-template", str(template),
                            "--chat-template-timeout", "60")
    yield process
    process.stop()


def test_allowed_hosts_and_origins(server):
    assert httpx.get(f"{server.url}/health", headers={"Host": "myhost.test:80"}).status_code == 200
    assert httpx.get(f"{server.url}/health", headers={"Host": "localhost"}).status_code == 400  # the list replaces
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "http://app.test", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "http://app.test"
    other = httpx.options(f"{server.url}/v1/completions", headers={"Origin": "http://other.test", **preflight})
    assert "access-control-allow-origin" not in other.headers


def stream(server, path: str, body: dict, started: threading.Event) -> list[dict | str]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/{path}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


def test_sigterm_ends_every_request_explicitly(server):
    completion = {"prompt": ["one", "two", "three", "four"], "n": 4, **LONG}
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 8, **LONG}
    with ThreadPoolExecutor(5) as pool:
        started = [threading.Event(), threading.Event()]
        streams = [pool.submit(stream, server, "completions", completion, started[0]),
                   pool.submit(stream, server, "chat/completions", chat, started[1])]
        plain = pool.submit(httpx.post, f"{server.url}/v1/completions", json=completion, timeout=60)
        spinning = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", timeout=60,
                               json={**chat, "chat_template_kwargs": {"spin": True}})
        assert all(event.wait(60) for event in started)
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(SHUTDOWN_TIMEOUT_S + 20) == 0, server.output()
        exit_s = time.monotonic() - signalled
        completion_events, chat_events = (s.result() for s in streams)
        plain, spinning = plain.result(), spinning.result()
    assert exit_s < SHUTDOWN_TIMEOUT_S + 10, exit_s

    for events, num_choices in ((completion_events, 16), (chat_events, 8)):
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 503 and "shutting down" in error["message"], error
        finished = {choice["index"]: choice["finish_reason"] for event in events[:-2] for choice in event["choices"]
                    if choice["finish_reason"]}
        assert sorted(finished) == list(range(num_choices)) and "abort" in finished.values(), finished
    for response in (plain, spinning):
        assert response.status_code == 503, response.text
        assert "shutting down" in response.json()["error"]["message"]
