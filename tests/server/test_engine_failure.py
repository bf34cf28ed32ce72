"""An engine failure in one request is that request's 500 (or its stream's last event); the others and later
requests are served. No client input makes the engine fail, so this test injects the failure into the real
engine's model runner (for prompts holding a marker token) and drives the real app in-process over httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import dsv3
from dsv3.api import TINY_CHECKPOINT
from dsv3.server.app import build_app
from dsv3.server.chat_template import ChatTemplate
from dsv3.server.handlers import ServerSettings

MARKER = 500  # a token id the failing prompts carry


@pytest.fixture(scope="module")
def app():
    model = dsv3.load_model(TINY_CHECKPOINT, backend="reference", quiet=True, progress=False, max_model_len=128,
                            cache_tokens=2048, max_num_seqs=4)
    runner = model.engine.runner
    real_run = runner.run

    def failing_run(step):
        if any(MARKER in seq.prompt_token_ids for seq, _ in step.scheduled()):
            raise RuntimeError("injected device fault")
        return real_run(step)

    runner.run = failing_run
    engine = model.async_engine
    settings = ServerSettings("tiny", str(TINY_CHECKPOINT), ChatTemplate.load(TINY_CHECKPOINT))
    yield build_app(engine, settings)
    engine.shutdown()


def test_a_failing_request_gets_500_and_the_others_are_served(app):
    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dsv3", timeout=60) as client:
            good = {"prompt": "Hello", "max_tokens": 6, "temperature": 0}
            bad = {"prompt": [0, 40, MARKER, 41], "max_tokens": 6}
            responses = await asyncio.gather(client.post("/v1/completions", json=good),
                                             client.post("/v1/completions", json=bad),
                                             client.post("/v1/completions", json=good))
            streamed = await client.post("/v1/completions", json={**bad, "stream": True})
            after = await client.post("/v1/completions", json=good)
        return responses, streamed, after

    (first, failed, second), streamed, after = asyncio.run(scenario())
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["code"] == 500 and "injected device fault" in error["message"]
    assert first.status_code == second.status_code == after.status_code == 200
    assert first.json()["choices"][0]["text"] == after.json()["choices"][0]["text"]
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "injected device fault" in json.loads(events[-2])["error"]["message"]
