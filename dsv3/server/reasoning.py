"""`--reasoning-parser deepseek_r1` (or `deepseek_v3`): DeepSeek-R1's and V3.1's reasoning apart from the answer.

R1 writes its reasoning, then `</think>`, then the answer. Newer R1 templates put `<think>\\n` in the
generation prompt, so the output may start inside the reasoning without the opening tag; an opening tag at
the very start is dropped. Text up to `</think>` is `reasoning_content`, the rest `content`; an output with no
`</think>` (cut off by max_tokens, say) is all reasoning, as vLLM and SGLang return it.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"

#: --reasoning-parser choices: vLLM's names (deepseek_v3: V3.1's thinking switch), and dsv3's first spelling
REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "deepseek-r1")


def reasoning_expected(parser: str | None, prompt: str, template_kwargs: dict) -> bool:
    """Whether a chat output starts with reasoning: R1 always; V3.1 (`deepseek_v3`) only with
    `chat_template_kwargs` `thinking` (or `enable_thinking`) on; never where the prompt already closed the
    reasoning with `</think>` (V3.1's non-thinking prompt does)."""
    if parser is None or prompt.rstrip().endswith(THINK_END):
        return False
    if parser == "deepseek_v3":
        return bool(template_kwargs.get("thinking", template_kwargs.get("enable_thinking", False)))
    return True


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held until the next delta)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; an empty part is None."""
    stream = ReasoningStream()
    reasoning, content = stream.feed(text)
    more_reasoning, _ = stream.finish()
    reasoning = (reasoning or "") + (more_reasoning or "")
    return reasoning or None, content


class ReasoningStream:
    """Splits streamed text deltas into reasoning and content deltas, even where a tag spans two deltas."""

    def __init__(self):
        self._pending = ""
        self._at_start = True
        self._in_reasoning = True

    def feed(self, delta: str) -> tuple[str | None, str | None]:
        """(reasoning delta, content delta) for a new piece of text; text that may be a tag is held back."""
        if not self._in_reasoning:
            return None, delta or None
        self._pending += delta
        if self._at_start:
            if len(self._pending) < len(THINK_START) and THINK_START.startswith(self._pending):
                return None, None
            if self._pending.startswith(THINK_START):
                self._pending = self._pending[len(THINK_START):]
            self._at_start = False
        end = self._pending.find(THINK_END)
        if end >= 0:
            reasoning, content = self._pending[:end], self._pending[end + len(THINK_END):]
            self._pending, self._in_reasoning = "", False
            return reasoning or None, content or None
        keep = held_back(self._pending, THINK_END)
        reasoning = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return reasoning or None, None

    def finish(self) -> tuple[str | None, str | None]:
        """The held-back text once the output has ended: it was reasoning after all."""
        reasoning, self._pending = self._pending, ""
        return reasoning or None, None
