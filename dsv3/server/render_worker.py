"""Rendering chat templates as transformers' `apply_chat_template` does, in this process or in a worker.

The Jinja environment: sandboxed, trim_blocks and lstrip_blocks, the loop-control extension,
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text. A template is code from the
checkpoint (or --chat-template): it can loop for ever or fill memory, and a thread running it cannot be
stopped. So the server renders in worker processes (dsv3.server.render_pool) it can kill: this file run
as a script is one. It imports nothing of dsv3 (a worker starts in a fraction of a second, without torch).

Worker protocol, one JSON object per line: the first line on stdin is the setup {"templates": {name:
source}, "special_tokens": {...}, "origin": str, "max_output_chars": int, "memory_bytes": int}; each
further line is a request {"messages", "tools", "add_generation_prompt", "kwargs"}, answered on stdout
with {"text": str} or {"error": str}. The worker exits at the end of stdin or when its parent dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: what render() passes itself; a template variable of the same name cannot come from the caller
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render(templates: dict, special_tokens: dict, messages: list[dict], tools: list[dict] | None,
           add_generation_prompt: bool, kwargs: dict) -> str:
    """The prompt text; raises whatever the template raises (see failure_message)."""
    template = templates.get("tool_use") if tools else None
    template = template or templates["default"]
    variables = {**special_tokens, **{k: v for k, v in kwargs.items() if k not in RESERVED}}
    return template.render(messages=messages, tools=tools, documents=None,
                           add_generation_prompt=add_generation_prompt, **variables)


def failure_message(origin: str, error: BaseException) -> str:
    """One line for a template that failed: its raise_exception (rejected) or any other error."""
    if isinstance(error, jinja2.TemplateError):
        return f"the chat template ({origin}) rejected the messages: {error}"
    if isinstance(error, MemoryError):
        return f"the chat template ({origin}) ran out of memory rendering the messages"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"the chat template ({origin}) failed on the messages: {type(error).__name__}: {text}"


def _exit_with_parent() -> None:
    """A worker whose server is gone (killed, say) ends too, even in the middle of a template that loops."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the server's terminal is the server's to handle
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    setup = json.loads(sys.stdin.readline())
    try:
        import resource

        limit = setup["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this platform: the time limit still holds
        pass
    env = environment()
    templates = {name: env.from_string(text) for name, text in setup["templates"].items()}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            text = render(templates, setup["special_tokens"], request["messages"], request["tools"],
                          request["add_generation_prompt"], request["kwargs"])
            if len(text) > setup["max_output_chars"]:
                reply = {"error": f"the chat template ({setup['origin']}) rendered {len(text)} characters, more "
                                  f"than the context can hold ({setup['max_output_chars']})"}
            else:
                reply = {"text": text}
        except Exception as e:  # noqa: BLE001 - every failure of the template is the request's error
            reply = {"error": failure_message(setup["origin"], e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
