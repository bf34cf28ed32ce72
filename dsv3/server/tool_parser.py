"""`--tool-call-parser deepseek_v3` / `deepseek_v31`: DeepSeek's tool-call tokens -> OpenAI `tool_calls`.

DeepSeek-V3 (and R1) write the answer text, then
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arguments": ...}
    ```<｜tool▁call▁end｜> ... more calls ... <｜tool▁calls▁end｜>
DeepSeek-V3.1 drops the type and the fence: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`.
A call that does not parse (no separator, no fenced block, arguments that are not a JSON object) comes back
as content from that point on, never as an error; calls already complete stay tool calls. One parser,
`ToolCallStream`, serves both modes: a whole output is one delta. Streaming with `stream_arguments` sends, as
vLLM does, the call's id and name as soon as its header is complete and then its arguments piece by piece;
the arguments are then not checked before they go out (a call cut off stays a call), only the header is.
"""

from __future__ import annotations

import json
import re

from dsv3.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, random_id
from dsv3.server.reasoning import held_back

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

#: --tool-call-parser choices: vLLM's names, and the dashed spelling dsv3 had first
TOOL_CALL_PARSERS = ("deepseek_v3", "deepseek_v31", "deepseek-v3")

#: a call's header (up to its arguments) and its whole body, per format
_HEADERS = {"v3": re.compile(r"\s*(?P<type>[^\n]*?)" + re.escape(SEP)
                             + r"(?P<name>[^\n]+?)[ \t]*\n```(?:json)?[ \t]*\n"),
            "v31": re.compile(r"\s*(?P<name>[^\n<]+?)\s*" + re.escape(SEP))}
_CALLS = {"v3": re.compile(r"\s*(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]+?)\s*\n"
                           r"```(?:json)?\s*\n(?P<arguments>.*?)\s*```\s*", re.DOTALL),
          "v31": re.compile(r"\s*(?P<name>[^\n<]+?)\s*" + re.escape(SEP) + r"(?P<arguments>.*?)\s*", re.DOTALL)}


def call_format(parser: str) -> str:
    """"v31" for DeepSeek-V3.1's format, else "v3"."""
    return "v31" if parser == "deepseek_v31" else "v3"


def _arguments_end(text: str, fmt: str) -> str:
    """The arguments of a call body's tail as written, without the closing fence."""
    text = text.rstrip()
    if fmt == "v3" and text.endswith("```"):
        text = text[:-3].rstrip()
    return text


def parse_call(body: str, fmt: str = "v3") -> tuple[str, str] | None:
    """(name, arguments JSON) of the text between a call's begin and end tokens; None if malformed."""
    match = _CALLS[fmt].fullmatch(body)
    if match is None:
        return None
    try:
        arguments = json.loads(match["arguments"])
    except json.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    return match["name"].strip(), match["arguments"].strip()


def parse_tool_calls(text: str, fmt: str = "v3") -> tuple[str | None, list[ToolCall]]:
    """(content, tool_calls) of a whole output; content is None when empty."""
    stream = ToolCallStream(fmt)
    pieces, calls = [], []
    for content, deltas in (stream.feed(text), stream.finish()):
        pieces.append(content or "")
        calls += [ToolCall(id=d.id, function=FunctionCall(name=d.function.name, arguments=d.function.arguments))
                  for d in deltas]
    return "".join(pieces) or None, calls


class ToolCallStream:
    """Splits streamed content deltas into content and tool-call deltas.

    Args:
        fmt: "v3" or "v31" (call_format).
        stream_arguments: send each call's header, then its arguments as they arrive (vLLM's streaming).
    """

    def __init__(self, fmt: str = "v3", stream_arguments: bool = False):
        self.fmt, self.stream_arguments = fmt, stream_arguments
        self._pending = ""
        self._phase = "content"  # content -> calls -> after (or raw once a call is malformed)
        self.num_calls = 0
        self._sent: str | None = None  # the arguments sent of the call being streamed

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
        """Whatever is held back once the output has ended: an unfinished call is content (one whose
        arguments are streaming ends with what arrived)."""
        if self._sent is not None:
            rest = _arguments_end(self._pending, self.fmt)[len(self._sent):]
            self._phase, self._pending, self._sent = "after", "", None
            return None, [self._arguments_delta(rest)] if rest else []
        pending, self._pending = self._pending, ""
        if self._phase == "calls" and (pending.strip() or not self.num_calls):
            return self._malformed(pending), []
        if self._phase == "content":
            return pending or None, []
        return None, []

    def _arguments_delta(self, arguments: str) -> DeltaToolCall:
        return DeltaToolCall(index=self.num_calls - 1, function=DeltaFunctionCall(arguments=arguments))

    def _stream_call(self, calls: list[DeltaToolCall]) -> bool:
        """Streaming the arguments of the current call: send what cannot be its end; True once it ended."""
        end = self._pending.find(CALL_END)
        text = self._pending if end < 0 else self._pending[:end]
        if end < 0:
            text = text[:len(text) - held_back(text, CALL_END)]
        safe = _arguments_end(text, self.fmt) if end >= 0 else text.rstrip(" \t\r\n`")
        if len(safe) > len(self._sent):
            calls.append(self._arguments_delta(safe[len(self._sent):]))
            self._sent = safe
        if end < 0:
            return False
        self._pending, self._sent = self._pending[end + len(CALL_END):], None
        return True

    def _take_calls(self) -> tuple[list[DeltaToolCall], str]:
        calls = []
        while True:
            if self._sent is not None and not self._stream_call(calls):
                return calls, ""
            text = self._pending.lstrip()
            if text.startswith(CALLS_END):
                self._phase, self._pending = "after", ""
                return calls, text[len(CALLS_END):]
            if not text.startswith(CALL_BEGIN):
                if CALL_BEGIN.startswith(text) or CALLS_END.startswith(text):
                    return calls, ""  # empty, or a begin/end token still arriving
                return calls, self._malformed(self._pending)
            end = text.find(CALL_END)
            if self.stream_arguments:
                header = _HEADERS[self.fmt].match(text, len(CALL_BEGIN))
                if header is not None and (end < 0 or header.end() <= end):
                    calls.append(DeltaToolCall(index=self.num_calls, id=random_id("call_"), type="function",
                                               function=DeltaFunctionCall(name=header["name"].strip(), arguments="")))
                    self.num_calls += 1
                    self._pending, self._sent = text[header.end():], ""
                    continue
            if end < 0:
                return calls, ""
            parsed = parse_call(text[len(CALL_BEGIN):end], self.fmt)
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
