"""Structured output: a grammar per request (JSON schema, JSON, regex, choice, EBNF, structural tag) that
masks the logits each step, with xgrammar (the engine vLLM and SGLang use).

A request's grammar is compiled once, when it is checked (in the caller's thread; xgrammar's compiler
caches compiled grammars by their source, so a schema sent again compiles in no time). Each of its
sequences gets a matcher. Before a step samples, the constrained rows' matchers fill a token bitmask on the
host (while a replayed step still runs on the device); the engine applies it to the logits before sampling,
as a plain tensor op, so every backend does the same; unconstrained rows of the same batch are left alone.
The sampled token then advances the matcher, and a grammar that has ended (it accepted the end-of-sentence
token) ends the sequence.

A preempted sequence keeps its generated tokens (the engine recomputes their cache, it does not resample
them), so its matcher is still in step: nothing to roll back. A constrained sequence does not speculate (MTP
drafts are dropped for it), so no unvetted token needs undoing either. With `reasoning_end` set (DeepSeek-R1's
`</think>`), a sequence samples freely until its output contains those tokens, and the grammar applies after.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, fields

import torch

from dsv3.errors import RequestError


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's `structured_outputs`): exactly one of json, json_object, regex,
    choice, grammar or structural_tag.

    Attributes:
        json: a JSON schema (a dict or its JSON text).
        json_object: any JSON object.
        regex: a regular expression the whole output matches.
        choice: the output is one of these strings.
        grammar: an EBNF grammar (GBNF, with a `root` rule).
        structural_tag: an xgrammar structural tag (dict or JSON text); tool calls are served through one.
        disable_any_whitespace: JSON without free whitespace between tokens (compact separators).
        reasoning_end: the grammar applies only after the output contains this text (R1's `</think>`).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None
    disable_any_whitespace: bool = False
    reasoning_end: str | None = None

    def __post_init__(self):
        kinds = [f.name for f in fields(self) if f.name in KINDS and getattr(self, f.name) not in (None, False)]
        if len(kinds) != 1:
            raise RequestError("structured output needs exactly one of json, json_object, regex, choice, grammar "
                               f"or structural_tag; got {', '.join(kinds) or 'none'}", param="structured_outputs")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise RequestError(f"choice must be a non-empty list of strings, got {self.choice!r}",
                               param="structured_outputs")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))


#: free whitespace between two JSON tokens at most (pretty-printing fits; a model cannot loop on blanks forever)
MAX_WHITESPACE = 16

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}/" else c for c in text)


class StructuredOutputs:
    """The engine's grammar compiler and the per-sequence matchers' bitmasks.

    Args:
        tokenizer: the engine's `tokenizers.Tokenizer` (its vocabulary becomes xgrammar's, built on first use).
        vocab_size: the model's logits width (rows past the tokenizer's vocabulary are never allowed).
        eos_token_ids: the tokens that end a grammar.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, sorted(eos_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                if self.tokenizer is None:
                    raise RequestError("structured output needs the checkpoint's tokenizer (this model has none)",
                                       param="structured_outputs")
                tok = self.tokenizer
                vocab = [""] * tok.get_vocab_size()
                for text, token in tok.get_vocab().items():
                    vocab[token] = text
                decoder = json.loads(tok.to_str()).get("decoder") or {}
                decoders = decoder.get("decoders", [decoder])
                types = {d.get("type") for d in decoders if isinstance(d, dict)}
                vocab_type = (xgr.VocabType.BYTE_LEVEL if "ByteLevel" in types else
                              xgr.VocabType.BYTE_FALLBACK if "ByteFallback" in types else xgr.VocabType.RAW)
                info = xgr.TokenizerInfo(vocab, vocab_type=vocab_type, vocab_size=self.vocab_size,
                                         stop_token_ids=self.eos_token_ids)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of a request (RequestError naming the field for a bad schema or grammar)."""
        compiler = self.compiler()
        kind = spec.kind
        try:
            if kind in ("json", "json_object"):
                schema = '{"type": "object"}' if kind == "json_object" else \
                    spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                if spec.disable_any_whitespace:
                    return compiler.compile_json_schema(schema, any_whitespace=False)
                return compiler.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":
                return compiler.compile_regex("|".join(f"({_regex_escape(c)})" for c in spec.choice))
            if kind == "grammar":
                return compiler.compile_grammar(spec.grammar)
            tag = spec.structural_tag
            return compiler.compile_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))
        except RequestError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses for bad input
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RequestError(f"structured output: the {kind} could not be compiled: {message}",
                               param="structured_outputs") from None

    def matcher(self, compiled, reasoning_end: str | None) -> "SequenceGrammar":
        end_ids = self.tokenizer.encode(reasoning_end, add_special_tokens=False).ids if reasoning_end else None
        return SequenceGrammar(compiled, end_ids)

    def bitmask(self, grammars: list["SequenceGrammar | None"]) -> torch.Tensor | None:
        """int32 [rows, ceil(vocab / 32)] of allowed tokens (all allowed for unconstrained rows), or None
        when no row is constrained this step."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.active and not g.matcher.is_terminated()]
        if not rows:
            return None
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        for i in rows:
            grammars[i].matcher.fill_next_token_bitmask(bitmask, i)
        return bitmask


class SequenceGrammar:
    """One sequence's grammar matcher, and whether it applies yet (after the reasoning)."""

    def __init__(self, compiled, reasoning_end_ids: list[int] | None):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.end_ids = reasoning_end_ids
        self.active = not reasoning_end_ids
        self._recent: list[int] = []

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it."""
        if self.active:
            return self.matcher.accept_token(token)
        self._recent = (self._recent + [token])[-len(self.end_ids):]
        self.active = self._recent == self.end_ids
        return True

    @property
    def terminated(self) -> bool:
        return self.active and self.matcher.is_terminated()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [S, V] with the tokens the bitmask (int32 [S, ceil(V / 32)], bit j of word w = token 32w + j)
    does not allow set to -inf; plain tensor ops, on the logits' device."""
    bits = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]
    return logits.masked_fill(~allowed, float("-inf"))
