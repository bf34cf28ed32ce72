"""Structured output and forced tool calls through a real `dsv3 serve`, with the real openai and LangChain clients.

The tiny checkpoint's random weights never write JSON or call a tool on their own, so every valid object and
call below is the grammar's doing.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from serve_helpers import API_KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)
    mood: Literal["happy", "sad"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                                  "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                 "b": {"type": "integer", "minimum": 0, "maximum": 9}}}}}
ASK = [{"role": "user", "content": "Tell me about someone"}]


@pytest.fixture(scope="module")
def server():
    """A server of its own: the tools' schemas rendered by the tiny tokenizer need a longer context."""
    process = ServerProcess("--api-key", API_KEY, "--tool-call-parser", "deepseek_v3", "--max-model-len", "1024")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def check_weather(arguments: str) -> dict:
    value = json.loads(arguments)
    assert set(value) == {"city", "days"} and isinstance(value["city"], str) and len(value["city"]) <= 10
    assert isinstance(value["days"], int) and 1 <= value["days"] <= 7
    return value


def test_openai_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Person,
                                               max_tokens=300, temperature=0)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"
    assert Person.model_validate_json(completion.choices[0].message.content) == person


def test_json_object_and_a_schema_with_n_choices_sampled_and_streamed(client):
    whole = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=300, temperature=0)
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema()}}
    whole = client.chat.completions.create(model="tiny", messages=ASK, response_format=schema,
                                           max_tokens=300, temperature=1.0, seed=3, n=3)
    assert len(whole.choices) == 3
    for choice in whole.choices:
        Person.model_validate_json(choice.message.content)
    chunks = client.chat.completions.create(model="tiny", messages=ASK, response_format=schema,
                                            max_tokens=300, temperature=1.0, seed=3, n=3, stream=True)
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
    ({"guided_choice": ["red", "green", "blue"]}, lambda text: text in ("red", "green", "blue")),
    ({"guided_grammar": 'root ::= "x" ("y" | "z") ("y" | "z")? "!"'}, lambda text: re.fullmatch(r"x[yz]{1,2}!", text)),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
    ({"structured_outputs": {"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                             "disable_any_whitespace": True}},
     lambda text: isinstance(json.loads(text), list) and len(json.loads(text)) <= 3),
])
def test_vllm_fields_constrain_completions_and_chat(client, extra, check):
    completion = client.completions.create(model="tiny", prompt="Answer:", max_tokens=100, temperature=0,
                                           extra_body=extra)
    assert completion.choices[0].finish_reason == "stop" and check(completion.choices[0].text)
    chat = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=100, temperature=0.8, seed=1,
                                          extra_body=extra)
    assert chat.choices[0].finish_reason == "stop" and check(chat.choices[0].message.content)


def test_constrained_and_free_requests_batch_together(client):
    import concurrent.futures

    def free(i):
        return client.completions.create(model="tiny", prompt=f"Free text {i}", max_tokens=20, temperature=0)

    def fixed(i):
        return client.completions.create(model="tiny", prompt=f"Free text {i}", max_tokens=20, temperature=0,
                                         extra_body={"guided_regex": "[ab]{5}"})

    solo_free = free(0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: f[0](f[1]), [(free, 0), (fixed, 0)] * 4))
    for i, result in enumerate(results):
        text = result.choices[0].text
        assert text == solo_free if i % 2 == 0 else re.fullmatch("[ab]{5}", text)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"min_tokens": 3}, "min_tokens"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_dsv3_cannot_honour_is_a_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "tiny", "messages": ASK, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tool_choice_required_and_named_make_valid_calls(client):
    required = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ADD],
                                              tool_choice="required", max_tokens=200, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "add")
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
    named = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_weather(calls[0].function.arguments)


def test_streamed_tool_arguments_assemble_to_the_same_call(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=200, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    name, arguments, pieces, finish = None, "", 0, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or ():
                assert call.index == 0
                name = call.function.name or name
                arguments += call.function.arguments or ""
                pieces += 1
    assert (name, arguments, finish) == ("get_weather", whole.function.arguments, "tool_calls")
    assert pieces > 2  # the arguments came in pieces, as vLLM streams them


def test_langchain_with_structured_output_both_methods(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="tiny", base_url=f"{server.url}/v1", api_key=API_KEY, temperature=0,
                                      max_tokens=300, max_retries=0)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Tell me about someone")
        assert isinstance(person, Person), method
