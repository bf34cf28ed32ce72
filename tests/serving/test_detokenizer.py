"""Incremental detokenization: equals decoding the whole output; stop strings end the text before them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from dsv3.api import TINY_CHECKPOINT
from dsv3.serving import detokenizer as detok
from dsv3.serving.detokenizer import IncrementalDetokenizer

TEXT = "Hello world, héllo 日本 test! Über naïve cafés."


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(TINY_CHECKPOINT / "tokenizer.json"))


@pytest.mark.parametrize("stream", [True, False])
def test_token_by_token_text_equals_decoding_everything(tokenizer, monkeypatch, stream):
    if not stream:
        monkeypatch.setattr(detok, "DecodeStream", None)  # the prefix-offset window
    prompt = tokenizer.encode("Say:").ids
    ids = tokenizer.encode(TEXT).ids
    d = IncrementalDetokenizer(tokenizer, prompt)
    seen = []
    for token in ids:
        d.add(token)
        seen.append(d.text)
    assert d.text == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]
    assert all("\ufffd" not in text for text in seen)  # no half characters on the way


def test_stop_string_ends_the_text_before_it_and_is_held_back_meanwhile(tokenizer):
    ids = tokenizer.encode(TEXT).ids
    d = IncrementalDetokenizer(tokenizer, [], stop=["naïve", "zzz"])
    shown = []
    stopped = None
    for token in ids:
        stopped = d.add(token)
        if stopped:
            break
        shown.append(d.visible_text(finished=False))
    assert stopped == "naïve"
    assert d.text == TEXT[:TEXT.index("naïve")]
    assert all(not s.endswith(("n", "na", "naï")) for s in shown)  # never a start of the stop string
    assert all(d.text.startswith(s) for s in shown)


def test_the_earliest_stop_string_wins(tokenizer):
    d = IncrementalDetokenizer(tokenizer, [], stop=["world", "Hello w"])
    for token in tokenizer.encode("Hello world").ids:
        if d.add(token):
            break
    assert d.text == ""
