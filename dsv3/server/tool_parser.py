"""`--tool-call-parser deepseek-v3`: DeepSeek-V3's tool-call tokens -> OpenAI `tool_calls`.

The model writes its answer text, then
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arguments": ...}
    ```<｜tool▁call▁end｜> ... more calls ... <｜tool▁calls▁end｜>
Streaming emits each call as one delta (id, name, whole arguments) as soon as its `<｜tool▁call▁end｜>`
arrives. A call that does not parse (no separator, no fenced block, arguments that are not a JSON object)
comes back as content from that point on, never as an error; calls already complete stay tool calls.
One parser, `ToolCallStream`, serves both modes: a whole output is one delta.
"""

from __future__ import annotations

import json
import re

from dsv3.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, random_id
from dsv3.server.reasoning import held_back

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

#: --tool-call-parser choices
TOOL_CALL_PARSERS = ("deepseek-v3",)

_CALL = re.compile(r"\s*(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]+?)\s*\n"
                   r"```(?:json)?\s*\n(?P<arguments>.*?)\s*```\s*", re.DOTALL)


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of the text between a call's begin and end tokens; None if malformed."""
    match = _CALL.fullmatch(body)
    if match is None:
        return None
    try:
        arguments = json.loads(match["arguments"])
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return match["name"].strip(), match["arguments"].strip()


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a whole output; content is None when empty."""
    stream = ToolCallStream()
    pieces, calls = [], []
    for content, deltas in (stream.feed(text), stream.finish()):
        pieces.append(content or "")
        calls += [ToolCall(id=d.id, function=FunctionCall(name=d.function.name, arguments=d.function.arguments))
                  for d in deltas]
    return "".join(pieces) or None, calls


class ToolCallStream:
    """Splits streamed content deltas into content and tool-call deltas."""

    def __init__(self):
        self._pending = ""
        self._phase = "content"  # content -> calls -> after (or raw once a call is malformed)
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str | None, list[DeltaToolCall]]:
        """(content delta, tool-call deltas) for a new piece of content."""
        if self._phase in ("after", "raw"):
            return delta or None, []
        self._pending += delta
        content = ""
        if self._phase == "content":
            begin = self._pending.find(CALLS_BEGIN)
            if begin < 0:
                keep = held_back(self._pending, CALLS_BEGIN)
                cut = len(self._pending) - keep
                content, self._pending = self._pending[:cut], self._pending[cut:]
                return content or None, []
            content, self._pending = self._pending[:begin], self._pending[begin + len(CALLS_BEGIN):]
            self._phase = "calls"
        calls, tail = self._take_calls()
        return (content + tail) or None, calls

    def finish(self) -> tuple[str | None, list[DeltaToolCall]]:
        """Whatever is held back once the output has ended: an unfinished call is content."""
        pending, self._pending = self._pending, ""
        if self._phase == "calls" and (pending.strip() or not self.num_calls):
            return self._malformed(pending), []
        if self._phase == "content":
            return pending or None, []
        return None, []

    def _take_calls(self) -> tuple[list[DeltaToolCall], str]:
        calls = []
        while True:
            text = self._pending.lstrip()
            if text.startswith(CALLS_END):
                self._phase, self._pending = "after", ""
                return calls, text[len(CALLS_END):]
            if not text.startswith(CALL_BEGIN):
                if CALL_BEGIN.startswith(text) or CALLS_END.startswith(text):
                    return calls, ""  # empty, or a begin/end token still arriving
                return calls, self._malformed(self._pending)
            end = text.find(CALL_END)
            if end < 0:
                return calls, ""
            parsed = parse_call(text[len(CALL_BEGIN):end])
            if parsed is None:
                return calls, self._malformed(self._pending)
            name, arguments = parsed
            calls.append(DeltaToolCall(index=self.num_calls, id=random_id("call_"), type="function",
                                       function=DeltaFunctionCall(name=name, arguments=arguments)))
            self.num_calls += 1
            self._pending = text[end + len(CALL_END):]

    def _malformed(self, text: str) -> str:
        """From here on everything is content; the opening token too when no call came out before."""
        self._phase, self._pending = "raw", ""
        return text if self.num_calls else CALLS_BEGIN + text
