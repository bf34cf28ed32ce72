"""The chat endpoint's parsers wired end to end: an engine that replays scripted output pieces (the tiny model
never writes tool calls or </think>) behind the real app, read by the real `openai` client in-process."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from dsv3.api import TINY_CHECKPOINT
from dsv3.server.app import build_app
from dsv3.server.chat_template import ChatTemplate
from dsv3.server.handlers import ServerSettings
from dsv3.server.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from dsv3.serving.engine import EngineStats
from dsv3.serving.outputs import CompletionOutput, RequestOutput
from dsv3.tokenizer import Tokenizer

CALL = f'{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{CALL_END}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


class ScriptedEngine:
    """AsyncEngine's surface; each request's output is the next script, one piece per step."""

    def __init__(self):
        self.tokenizer = Tokenizer(TINY_CHECKPOINT)
        self.max_model_len = 1024
        self.scripts: list[list[str]] = []

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0)

    def check_request(self, prompt_token_ids, params):
        return params  # every scripted request runs

    async def generate(self, prompt_token_ids, params, request_id, group=""):
        pieces, text = self.scripts.pop(0), ""
        for step, piece in enumerate(pieces):
            await asyncio.sleep(0)
            text += piece
            done = step == len(pieces) - 1
            yield RequestOutput(request_id, list(prompt_token_ids), [CompletionOutput(
                0, text, list(range(4, 5 + step)), None, "stop" if done else None)], done)

    async def abort(self, request_id):
        pass

    def shutdown(self):
        pass


@pytest.fixture
def chat():
    engine = ScriptedEngine()
    settings = ServerSettings("tiny", str(TINY_CHECKPOINT), ChatTemplate.load(TINY_CHECKPOINT),
                              reasoning_parser="deepseek-r1", tool_call_parser="deepseek-v3")
    app = build_app(engine, settings)

    def run(pieces: list[str], stream: bool, **fields):
        async def call():
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dsv3/v1")
            async with openai.AsyncOpenAI(base_url="http://dsv3/v1", api_key="x", http_client=http) as client:
                engine.scripts.append(pieces)
                response = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], stream=stream,
                    **fields)
                return [chunk async for chunk in response] if stream else response
        return asyncio.run(call())
    return run


def assemble(chunks) -> dict:
    """What a streaming client rebuilds from the deltas."""
    out = {"reasoning": "", "content": "", "calls": {}, "finish": None}
    for chunk in chunks:
        choice = chunk.choices[0]
        delta = choice.delta
        out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
        out["content"] += delta.content or ""
        for call in delta.tool_calls or []:
            entry = out["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        out["finish"] = choice.finish_reason or out["finish"]
    return out


SCRIPT = ["Hmm, the user ", "wants weather.</th", "ink>Let me ", "check.", CALLS_BEGIN[:5], CALLS_BEGIN[5:],
          CALL[:20], CALL[20:50], CALL[50:], CALLS_END]


def test_reasoning_content_and_tool_calls_whole(chat):
    choice = chat(SCRIPT, stream=False, tools=TOOLS).choices[0]
    assert choice.message.reasoning_content == "Hmm, the user wants weather."
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.finish_reason == "tool_calls"


def test_reasoning_content_and_tool_calls_streamed(chat):
    chunks = chat(SCRIPT, stream=True, tools=TOOLS)
    assert chunks[0].choices[0].delta.role == "assistant"
    out = assemble(chunks)
    assert out["reasoning"] == "Hmm, the user wants weather." and out["content"] == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in out["calls"].values()] == [("get_weather",
                                                                                          {"city": "Paris"})]
    assert out["calls"][0]["id"].startswith("call_") and out["finish"] == "tool_calls"


def test_malformed_tool_output_is_content_not_an_error(chat):
    broken = ["</think>Sure.", CALLS_BEGIN, CALL_BEGIN, "function get_weather without a separator", CALL_END]
    whole = chat(broken, stream=False, tools=TOOLS).choices[0]
    assert whole.message.content == "".join(broken)[len("</think>"):] and not whole.message.tool_calls
    assert whole.finish_reason == "stop"
    streamed = assemble(chat(broken, stream=True, tools=TOOLS))
    assert streamed["content"] == whole.message.content and not streamed["calls"] and streamed["finish"] == "stop"


def test_without_tools_the_markers_stay_content(chat):
    choice = chat(["</think>", CALLS_BEGIN, CALL, CALLS_END], stream=False).choices[0]
    assert choice.message.content == CALLS_BEGIN + CALL + CALLS_END and not choice.message.tool_calls


def test_outputs_waiting_together_are_handed_on_as_the_latest_one():
    """A reader slower than the engine gets one (cumulative) output for several steps, never stale ones."""
    from dsv3.server.metrics import ServerMetrics
    from dsv3.server.runner import RequestGroup

    class Burst(ScriptedEngine):
        async def generate(self, prompt_token_ids, params, request_id, group=""):  # no await between steps
            for step in range(5):
                yield RequestOutput(request_id, list(prompt_token_ids), [CompletionOutput(
                    0, "x" * (step + 1), list(range(step + 1)), None, "length" if step == 4 else None)], step == 4)

    engine = Burst()
    group = RequestGroup(engine, "cmpl-1", [[1, 2]], None, ServerMetrics(engine.stats, "tiny").timer())

    async def read():
        return [output async for _, output in group.outputs()]

    outputs = asyncio.run(read())
    assert [o.outputs[0].text for o in outputs] == ["xxxxx"] and outputs[0].finished
