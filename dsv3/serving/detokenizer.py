"""Incremental detokenization and stop strings.

Each new token's text comes from the `tokenizers` library's DecodeStream (which keeps the few
previous tokens it needs, so multi-byte characters and merges come out right) or, where the library
has no DecodeStream, from a prefix-offset window of recent tokens. Stop strings are searched only in
the new text (and the stop-length tail before it); text that could still be the start of a stop
string is held back from `visible_text` until it cannot.
"""

from __future__ import annotations

from typing import Sequence as Seq

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

#: prompt tokens given to the decoder as context for the first output token
PROMPT_CONTEXT = 8


class IncrementalDetokenizer:
    """The text of one completion, token by token.

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        prompt_token_ids: the prompt (its last tokens give the first output token its context).
        skip_special_tokens: leave special tokens out of the text.
        stop: stop strings.
    """

    def __init__(self, tokenizer, prompt_token_ids: Seq[int], skip_special_tokens: bool = True,
                 stop: Seq[str] = ()):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = list(stop)
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.num_tokens = 0  # tokens added
        context = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._stream = None
        if DecodeStream is not None:
            try:
                self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            except TypeError:  # a DecodeStream without prefill
                self._stream = None
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def add(self, token_id: int) -> str | None:
        """Append one token's text; returns the stop string it completed, if any (the text then ends before it)."""
        before = len(self.text)
        self.num_tokens += 1
        self.text += self._decode_next(token_id)
        if not self.stop or len(self.text) == before:
            return None
        start = max(0, before - self.max_stop_len + 1)
        found = None
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return None
        self.text = self.text[:found[0]]
        return found[1]

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished, else without a tail that may begin a stop string."""
        if finished or not self.stop:
            return self.text
        text = self.text
        for keep in range(min(len(text), self.max_stop_len - 1), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stop):
                return text[:-keep]
        return text

    def _decode_next(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self.tokenizer, token_id) or ""
        # the prefix-offset window: decode the recent tokens with and without the new ones
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset],
                                       skip_special_tokens=self.skip_special_tokens)
        full = self.tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]
