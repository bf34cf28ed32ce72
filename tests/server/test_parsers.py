"""The R1 reasoning parser and the V3 tool-call parser on scripted text streams, split every way."""

from __future__ import annotations

import json

import pytest

from dsv3.server.reasoning import ReasoningStream, reasoning_expected, split_reasoning
from dsv3.server.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallStream, parse_tool_calls


def splits(text: str):
    """The text cut into deltas several ways: whole, per character, in pairs and triples, at every point."""
    yield [text]
    yield list(text)
    for size in (2, 3, 5):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


def run_reasoning(deltas):
    stream, reasoning, content = ReasoningStream(), "", ""
    for delta in deltas:
        r, c = stream.feed(delta)
        assert r != "" and c != ""  # empty pieces are None, never sent
        reasoning, content = reasoning + (r or ""), content + (c or "")
    r, c = stream.finish()
    return reasoning + (r or ""), content + (c or "")


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", "\nLet me think.\n", "\n\nThe answer is 4."),
    ("Starts inside the reasoning.</think>Answer", "Starts inside the reasoning.", "Answer"),
    ("No end tag: cut off while thinking <", "No end tag: cut off while thinking <", None),
    ("<think>only reasoning</think>", "only reasoning", None),
    ("</think>just the answer", None, "just the answer"),
    ("<thinking is not the tag</think>x", "<thinking is not the tag", "x"),
    ("a</thin", "a</thin", None),
    ("r</think>content mentions </think> again", "r", "content mentions </think> again"),
])
def test_reasoning_split_whole_and_streamed(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    for deltas in splits(text):
        assert run_reasoning(deltas) == (reasoning or "", content or ""), deltas


def test_reasoning_stream_holds_a_partial_tag_and_then_releases_it():
    stream = ReasoningStream()
    assert stream.feed("thinking </th") == ("thinking ", None)
    assert stream.feed("at") == ("</that", None)
    assert stream.feed(" more </") == (" more ", None)
    assert stream.feed("think>Hi") == (None, "Hi")
    assert stream.feed(" there") == (None, " there")


def call(name: str, arguments: dict, kind: str = "function") -> str:
    return f"{CALL_BEGIN}{kind}{SEP}{name}\n```json\n{json.dumps(arguments)}\n```{CALL_END}"


WEATHER = call("get_weather", {"city": "Paris", "unit": "C"})
TIME = call("get_time", {"zone": "Europe/Paris"})


def run_tools(deltas):
    stream, content, calls = ToolCallStream(), "", []
    for delta in deltas + [None]:
        c, new = stream.feed(delta) if delta is not None else stream.finish()
        assert c != ""
        content += c or ""
        calls += [(d.index, d.type, d.function.name, json.loads(d.function.arguments)) for d in new]
        assert all(d.id.startswith("call_") for d in new)
    return content, calls


@pytest.mark.parametrize("text, content, calls", [
    ("Plain answer, no tools.", "Plain answer, no tools.", []),
    (f"Let me check.{CALLS_BEGIN}{WEATHER}{CALLS_END}", "Let me check.",
     [(0, "function", "get_weather", {"city": "Paris", "unit": "C"})]),
    (f"{CALLS_BEGIN}{WEATHER}\n{TIME}{CALLS_END}", "",
     [(0, "function", "get_weather", {"city": "Paris", "unit": "C"}),
      (1, "function", "get_time", {"zone": "Europe/Paris"})]),
    (f"{CALLS_BEGIN}{WEATHER}", "", [(0, "function", "get_weather", {"city": "Paris", "unit": "C"})]),
])
def test_tool_calls_whole_and_streamed(text, content, calls):
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert parsed_content == (content or None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed_calls] == [c[2:] for c in calls]
    assert all(c.type == "function" and c.id.startswith("call_") for c in parsed_calls)
    for deltas in splits(text):
        assert run_tools(deltas) == (content, calls), deltas


@pytest.mark.parametrize("text", [
    f"{CALLS_BEGIN}{CALL_BEGIN}function get_weather no separator{CALL_END}{CALLS_END}",
    f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{not json\n```{CALL_END}{CALLS_END}",
    f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n[1, 2]\n```{CALL_END}{CALLS_END}",
    f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Par",
    f"{CALLS_BEGIN}garbage instead of a call",
    f"{CALLS_BEGIN}",
])
def test_malformed_tool_output_comes_back_as_content(text):
    assert parse_tool_calls(text) == (text, [])
    for deltas in splits(text):
        assert run_tools(deltas) == (text, []), deltas


def test_a_malformed_call_after_a_good_one_keeps_the_good_one():
    bad = f"{CALL_BEGIN}function{SEP}broken\n```json\n{{oops\n```{CALL_END}{CALLS_END}"
    content, calls = parse_tool_calls(f"{CALLS_BEGIN}{WEATHER}{bad}")
    assert [c.function.name for c in calls] == ["get_weather"]
    assert content == bad


def test_text_after_the_calls_is_content():
    content, calls = parse_tool_calls(f"A{CALLS_BEGIN}{WEATHER}{CALLS_END} B")
    assert content == "A B" and len(calls) == 1


def test_reasoning_then_tool_calls_compose():
    text = f"<think>need the weather</think>Checking.{CALLS_BEGIN}{WEATHER}{CALLS_END}"
    reasoning, rest = split_reasoning(text)
    content, calls = parse_tool_calls(rest)
    assert (reasoning, content, [c.function.name for c in calls]) == ("need the weather", "Checking.", ["get_weather"])


def run_streamed_arguments(deltas, fmt="v3"):
    """Content and calls as a client assembles them from vLLM-style deltas (header, then argument pieces)."""
    stream, content, calls = ToolCallStream(fmt, stream_arguments=True), "", {}
    for delta in deltas + [None]:
        c, new = stream.feed(delta) if delta is not None else stream.finish()
        content += c or ""
        for d in new:
            if d.id is not None:
                assert d.index not in calls and d.function.arguments == ""
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
    return content, [(name, json.loads(arguments)) for name, arguments in calls.values()]


V31_WEATHER = f'{CALL_BEGIN}get_weather{SEP}{{"city": "Paris", "unit": "C"}}{CALL_END}'


@pytest.mark.parametrize("fmt, text", [
    ("v3", f"Let me check.{CALLS_BEGIN}{WEATHER}\n{TIME}{CALLS_END}"),
    ("v31", f"Let me check.{CALLS_BEGIN}{V31_WEATHER}{CALLS_END}"),
])
def test_streamed_arguments_assemble_to_the_whole_calls(fmt, text):
    content, calls = parse_tool_calls(text, fmt)
    expected = (content, [(c.function.name, json.loads(c.function.arguments)) for c in calls])
    assert expected[0] == "Let me check." and expected[1][0] == ("get_weather", {"city": "Paris", "unit": "C"})
    for deltas in splits(text):
        assert run_streamed_arguments(deltas, fmt) == expected, deltas
    pieces = list(text)  # one character at a time: the arguments arrive in many pieces
    stream = ToolCallStream(fmt, stream_arguments=True)
    argument_deltas = [d for piece in pieces for d in stream.feed(piece)[1] if d.id is None]
    assert len(argument_deltas) > 5


@pytest.mark.parametrize("parser, prompt, kwargs, expected", [
    (None, "<｜Assistant｜>", {}, False),
    ("deepseek_r1", "<｜Assistant｜><think>\n", {}, True),
    ("deepseek_r1", "<｜Assistant｜>", {}, True),
    ("deepseek_r1", "<｜Assistant｜></think>", {}, False),  # the prompt closed the reasoning already
    ("deepseek_v3", "<｜Assistant｜><think>", {"thinking": True}, True),  # V3.1 thinking on
    ("deepseek_v3", "<｜Assistant｜></think>", {"thinking": False}, False),  # V3.1 thinking off
    ("deepseek_v3", "<｜Assistant｜>", {}, False),  # V3 never thinks
])
def test_where_reasoning_is_expected(parser, prompt, kwargs, expected):
    assert reasoning_expected(parser, prompt, kwargs) is expected
