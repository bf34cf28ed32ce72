"""SamplingParams: how one request's tokens are picked and when it stops (vLLM's names and meanings)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dsv3.errors import ConfigError, RequestError
from dsv3.serving.structured import StructuredOutputsParams

#: a positive temperature below this is raised to it: smaller ones overflow the softmax into NaN
MIN_TEMPERATURE = 1e-2
MAX_LOGPROBS = 20

#: the fields a checkpoint's generation_config.json may set defaults for
DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    Attributes:
        n: completions to generate from the prompt.
        max_tokens: tokens to generate at most per completion; None: up to the context length.
        temperature: 0 decodes greedily; None takes the checkpoint's default, else 1.
        top_p: nucleus threshold in (0, 1]; None: the checkpoint's default, else 1 (off).
        top_k: keep the k likeliest tokens; None, 0 or -1: the checkpoint's default, else off.
        min_p: drop tokens below min_p times the likeliest's probability; None: default, else 0.
        presence_penalty, frequency_penalty: in [-2, 2], subtracted once / per occurrence for each
            token already generated.
        repetition_penalty: > 0; divides positive (multiplies negative) logits of tokens in the prompt or
            output; None: default, else 1 (off).
        seed: seeds this request's own generator: the same seed gives the same text whatever else runs.
        stop: strings that end a completion; the returned text ends before them.
        stop_token_ids: token ids that end a completion (kept in token_ids).
        ignore_eos: keep going past the end-of-sentence token.
        logprobs: return the top `logprobs` log-probabilities (plus the sampled token's) of each token.
        skip_special_tokens: leave special tokens out of the text.
        structured_outputs: a grammar the output must match (JSON schema, regex, choice, EBNF, ...).
        prompt_logprobs: return the top `prompt_logprobs` log-probabilities (plus the prompt's own token's) of
            each prompt token after the first, computed in the prefill.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    prompt_logprobs: int | None = None
    _resolved: bool = field(default=False, repr=False, compare=False)
    _grammar: object = field(default=None, repr=False, compare=False)  # the compiled structured_outputs

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise RequestError naming the first field out of type or range."""
        _int("n", self.n, low=1)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, low=1)
        if self.temperature is not None:
            _number("temperature", self.temperature, low=0.0)
        if self.top_p is not None:
            _number("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None:
            _int("top_k", self.top_k, low=-1)
        if self.min_p is not None:
            _number("min_p", self.min_p, low=0.0, high=1.0)
        _number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.repetition_penalty is not None:
            _number("repetition_penalty", self.repetition_penalty)
            if self.repetition_penalty <= 0:
                raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                   param="repetition_penalty")
        if self.seed is not None:
            _int("seed", self.seed, low=-(2**63), high=2**63 - 1)  # a 64-bit integer, as torch seeds take
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise RequestError(f"stop must be a string or a list of strings, got {self.stop!r}", param="stop")
            if any(s == "" for s in self.stop):
                raise RequestError("stop strings must not be empty", param="stop")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise RequestError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
                                   param="stop_token_ids")
            for token in self.stop_token_ids:
                _int("stop_token_ids", token, low=0)
            self.stop_token_ids = list(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be true or false, got {getattr(self, name)!r}", param=name)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise RequestError(f"structured_outputs must be a StructuredOutputsParams, got "
                               f"{type(self.structured_outputs).__name__}", param="structured_outputs")

    def resolved(self, defaults: dict | None = None) -> "SamplingParams":
        """A copy with every None replaced by the checkpoint's default (`defaults`, from
        generation_defaults) or the neutral value, and a tiny positive temperature raised to MIN_TEMPERATURE."""
        if self._resolved:
            return self
        defaults = defaults or {}
        neutral = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        values = {name: defaults.get(name, neutral[name]) if getattr(self, name) is None else getattr(self, name)
                  for name in DEFAULTABLE}
        if values["top_k"] in (None, -1):
            values["top_k"] = 0
        if 0 < values["temperature"] < MIN_TEMPERATURE:
            values["temperature"] = MIN_TEMPERATURE
        out = dataclasses.replace(self, **values, stop=list(self.stop or []),
                                  stop_token_ids=list(self.stop_token_ids or []))
        out._resolved = True
        return out

    def summary(self) -> str:
        """max_tokens and the settings that differ from the defaults, for a log line."""
        default = SamplingParams()
        shown = [(f.name, repr(getattr(self, f.name))) for f in dataclasses.fields(self) if f.name == "max_tokens"
                 or not f.name.startswith("_") and getattr(self, f.name) != getattr(default, f.name)]
        return ", ".join(f"{name}={value if len(value) <= 80 else value[:77] + '...'}" for name, value in shown)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name} must be {_range(low, high)}, got {value}", param=name)


def _number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name} must be {_range(low, high)}, got {value}", param=name)


def _range(low, high) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in [{low}, {high}]"


def generation_defaults(checkpoint: str | Path | None) -> dict:
    """Sampling defaults from a checkpoint's generation_config.json: temperature, top_p, top_k, min_p,
    repetition_penalty where it sets them; `do_sample: false` without a temperature means greedy.

    A file that is there but unreadable, or whose values are not valid sampling settings, is a
    ConfigError naming the file and the field: its defaults (R1's temperature 0.6) must not be dropped
    silently.
    """
    if checkpoint is None:
        return {}
    path = Path(checkpoint) / "generation_config.json"
    if not path.exists():
        return {}
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    defaults = {}
    for name in DEFAULTABLE:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: {name} must be a finite number, found {value!r}")
        if name == "top_k" and value != int(value):  # int() would make 2.7 a 2 without a word
            raise ConfigError(f"{path}: top_k must be an integer, found {value!r}")
        defaults[name] = int(value) if name == "top_k" else float(value)
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    try:
        SamplingParams(**defaults)
    except RequestError as e:
        raise ConfigError(f"{path}: {e}") from e
    return defaults
