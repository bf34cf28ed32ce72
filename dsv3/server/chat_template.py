"""Chat messages -> prompt text with the checkpoint's own Jinja chat template.

Renders as transformers' `apply_chat_template` does: a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, the loop-control extension, `raise_exception`, `strftime_now` and a `tojson` that keeps
non-ASCII text; the template sees `messages`, `tools`, `add_generation_prompt` and the tokenizer's special
tokens (`bos_token`, `eos_token`, ...). The template comes from `--chat-template FILE`, else the
checkpoint's tokenizer_config.json `chat_template` (a string, or a list of named templates), else its
chat_template.jinja. A checkpoint with none gets a clear error on chat requests, never a guessed format.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jinja2

from dsv3.errors import Dsv3Error, RequestError
from dsv3.server.render_worker import RESERVED, environment, failure_message
from dsv3.server.render_worker import render as render_template

#: tokenizer_config.json keys that transformers passes to the template as special tokens
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class NoChatTemplateError(RequestError):
    """The checkpoint has no chat template and none was given with --chat-template."""


def _token_text(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with.

    Args:
        source: the Jinja text, or named templates {name: text} ("default", "tool_use", ...).
        special_tokens: bos_token, eos_token, ... as the template sees them.
        origin: where the template came from, for error messages.
    """

    def __init__(self, source: str | dict[str, str], special_tokens: dict[str, str], origin: str):
        self.origin = origin
        self.special_tokens = dict(special_tokens)
        env = environment()
        named = source if isinstance(source, dict) else {"default": source}
        self.sources = dict(named)
        try:
            self._templates = {name: env.from_string(text) for name, text in named.items()}
        except jinja2.TemplateSyntaxError as e:
            raise Dsv3Error(f"{origin}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
        if "default" not in self._templates:
            raise Dsv3Error(f"{origin}: named chat templates need one called 'default' "
                            f"(found: {', '.join(self._templates)})")

    @classmethod
    def load(cls, checkpoint: str | Path, override: str | Path | None = None) -> ChatTemplate | None:
        """The chat template for a checkpoint directory; None when it has none and none is given.

        Args:
            checkpoint: the checkpoint directory (tokenizer_config.json, optionally chat_template.jinja).
            override: a Jinja file that replaces the checkpoint's template (`--chat-template`).
        """
        checkpoint = Path(checkpoint)
        settings = {}
        config_file = checkpoint / "tokenizer_config.json"
        if config_file.is_file():
            try:
                settings = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Dsv3Error(f"{config_file}: cannot read it as JSON ({e})") from None
        special = {key: _token_text(settings[key]) for key in SPECIAL_TOKEN_KEYS if _token_text(settings.get(key))}
        extra = settings.get("additional_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [_token_text(t) for t in extra]
        if override is not None:
            path = Path(override)
            try:
                return cls(path.read_text(encoding="utf-8"), special, str(path))
            except (OSError, UnicodeDecodeError) as e:
                raise Dsv3Error(f"{path}: cannot read the chat template (--chat-template takes a Jinja file: "
                                f"{e})") from None
        source = settings.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            source = {entry["name"]: entry["template"] for entry in source}
        if source:
            return cls(source, special, f"{config_file} chat_template")
        jinja_file = checkpoint / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special, str(jinja_file))
        return None

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text for a conversation.

        Args:
            messages: [{"role", "content", ...}] as OpenAI's API takes them (content a string).
            tools: OpenAI tool definitions [{"type": "function", "function": {...}}], or None.
            add_generation_prompt: end with the assistant's turn opener so the model answers.
            kwargs: further template variables (e.g. a template's thinking switch).

        Raises:
            RequestError: the template rejected the conversation (its raise_exception) or failed on it.
        """
        check_template_kwargs(kwargs)
        try:
            return render_template(self._templates, self.special_tokens, messages, tools, add_generation_prompt,
                                   kwargs)
        except Exception as e:  # noqa: BLE001 - the template is code: whatever it raises is this request's error
            raise RequestError(failure_message(self.origin, e), param="messages") from None


def check_template_kwargs(kwargs: dict) -> None:
    """chat_template_kwargs may not set what the server passes the template itself."""
    taken = [key for key in kwargs if key in RESERVED]
    if taken:
        raise RequestError(f"chat_template_kwargs may not set {', '.join(map(repr, taken))}: the server passes "
                           f"{', '.join(RESERVED)} itself", param="chat_template_kwargs")


#: what the special tokens of DeepSeek's (and most) chat templates look like
SPECIAL_TOKEN_PATTERN = re.compile(r"<｜[^<>｜]*｜>|<\|[^<>|]*\|>")
PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
         {"role": "user", "content": "u"}]


def check_template_tokens(template: ChatTemplate, tokenizer, timeout: float | None = None) -> list[str]:
    """The special tokens the template writes must be tokens of the tokenizer, or prompts carry them as plain
    text. Those of a plain conversation missing: Dsv3Error naming them and the files. Those only in other
    paths of the template (tool calls, say) missing: returned as notes for the caller to print.

    A template still rendering the plain conversation after `timeout` seconds is a Dsv3Error too: the render
    runs in a daemon thread, which a caller about to exit leaves behind (a thread cannot be stopped)."""
    outcome: list = []

    def render() -> None:
        try:
            outcome.append(template.render(PROBE))
        except RequestError:  # a template that refuses this conversation: nothing to learn from it
            outcome.append("")
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome.append(e)

    worker = threading.Thread(target=render, name="chat-template-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise Dsv3Error(f"{template.origin}: the chat template did not render a plain four-message conversation "
                        f"within {timeout:g} s (a loop?); fix it or pass another with --chat-template FILE")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    rendered = outcome[0]
    written = set(SPECIAL_TOKEN_PATTERN.findall(rendered))
    written |= {t for t in template.special_tokens.values() if isinstance(t, str) and t and t in rendered}
    missing = sorted(t for t in written if not tokenizer.has_token(t))
    if missing:
        raise Dsv3Error(f"{template.origin}: the chat template writes {', '.join(missing)}, which the checkpoint's "
                        f"tokenizer.json does not have as tokens: every prompt would carry them as plain text (use "
                        f"the tokenizer files that belong to this template)")
    named = {t for source in template.sources.values() for t in SPECIAL_TOKEN_PATTERN.findall(source)}
    unknown = sorted(t for t in named - written if not tokenizer.has_token(t))
    return [f"{template.origin}: the chat template can write {', '.join(unknown)}, which tokenizer.json does not have "
            "as tokens (they would be plain text where the template uses them)"] if unknown else []


def no_template_error(checkpoint: str | Path) -> NoChatTemplateError:
    return NoChatTemplateError(f"{checkpoint}: the checkpoint has no chat template (no chat_template in "
                               "tokenizer_config.json, no chat_template.jinja); pass --chat-template FILE, "
                               "or use /v1/completions with the prompt formatted yourself", param="messages")
