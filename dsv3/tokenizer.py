"""The checkpoint's tokenizer (tokenizer.json); chat prompts come from its chat template (dsv3.server.chat_template)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from dsv3.checkpoint.read import check_regular_file, read_json
from dsv3.errors import Dsv3Error, UsageError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


class Tokenizer:
    """Text <-> token ids with the checkpoint's tokenizer.json.

    Args:
        path: the checkpoint directory (tokenizer.json, optionally tokenizer_config.json).
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise Dsv3Error(f"{path}: no tokenizer.json (pass token ids, or a checkpoint with its tokenizer files)")
        check_regular_file(file)
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise Dsv3Error(f"{file}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
        settings = {}
        if (path / "tokenizer_config.json").exists():
            settings = read_json(path / "tokenizer_config.json", "tokenizer config")
            if not isinstance(settings, dict):
                raise Dsv3Error(f"{path / 'tokenizer_config.json'}: expected a JSON object, "
                                f"found {type(settings).__name__}")
        self.settings = settings
        self.bos_token = _token_text(settings.get("bos_token")) or BOS
        self.eos_token = _token_text(settings.get("eos_token")) or EOS
        self.add_bos = settings.get("add_bos_token", True)
        for name in ("bos_token", "eos_token"):
            if not isinstance(getattr(self, name), str):
                raise Dsv3Error(f"{path / 'tokenizer_config.json'}: {name} must be a string or "
                                f"{{\"content\": string}}, found {settings.get(name)!r}")
        self.bos_id = self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        for name in ("bos_token", "eos_token"):  # named but missing: dropped or never matched, without a word
            if _token_text(settings.get(name)) and not self.has_token(getattr(self, name)):
                raise Dsv3Error(f"{path / 'tokenizer_config.json'}: {name} {getattr(self, name)!r} is not a token "
                                f"of {file} (a tokenizer_config.json from another model?)")

    def has_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary (a special token, say)."""
        return self._tok.token_to_id(text) is not None

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (the engine's incremental detokenizer steps it)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8 reach Python as lone surrogates
            raise UsageError(f"the prompt is not valid UTF-8 text (byte {e.start} of it, "
                             f"{text[e.start:e.end].encode('utf-8', 'surrogateescape')!r})") from None
        # encode_batch lets go of the GIL while it runs (encode does not): the server tokenizes in a thread
        # and its event loop goes on answering meanwhile
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and not text.startswith(self.bos_token):
            ids = [self.bos_id] + ids
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """No token covers more characters of text than this, so a text of c characters is at least
        c / max_token_chars tokens: a prompt that cannot fit the context is refused before it is tokenized.
        None where the bound would not hold: a normalizer could shorten the text first, or a model other than
        BPE (or BPE fusing unknown characters) could make one token of any length."""
        spec = json.loads(self._tok.to_str())
        normalizer, model = spec.get("normalizer"), spec.get("model") or {}
        if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
            return None
        if model.get("type") != "BPE" or (model.get("unk_token") is not None and model.get("fuse_unk")):
            return None
        # a byte-level token's string has a character per byte, each one to two UTF-8 bytes; a text
        # character is at least one byte: so a vocabulary string's UTF-8 length bounds its text length
        return max(len(token.encode("utf-8", "surrogatepass")) for token in self._tok.get_vocab())

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) computed without tokenizing (0 where there is none)."""
        return -(-len(text) // self.max_token_chars) if self.max_token_chars else 0

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value
