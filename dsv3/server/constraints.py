"""A request's output constraint: OpenAI's `response_format`, vLLM's `structured_outputs` and its older
`guided_*` fields, and forced tool calls (`tool_choice` "required" or a named function), all mapped onto the
engine's StructuredOutputsParams.

Tool calls are constrained to the model's own tool-call format (V3's or V3.1's) through an xgrammar structural
tag whose arguments follow each function's `parameters` schema, so the output parses into `tool_calls` with the
same parser as in `auto` mode.
"""

from __future__ import annotations

import json
from typing import Any

from dsv3.server.protocol import APIError
from dsv3.server.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from dsv3.serving.structured import StructuredOutputsParams

#: vLLM's structured_outputs keys dsv3 honours (the others are refused by name)
STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag", "disable_any_whitespace")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def _from_response_format(response_format: dict[str, Any]) -> dict | None:
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError("response_format json_schema must be {\"name\": ..., \"schema\": {...}}",
                           param="response_format")
        schema = spec.get("schema")
        return {"json": schema if isinstance(schema, dict) else {}}
    if kind == "structural_tag":
        return {"structural_tag": {k: v for k, v in response_format.items()}}
    raise APIError(f"response_format type {kind!r} is not one of text, json_object, json_schema, structural_tag",
                   param="response_format")


def _from_structured_outputs(value: dict[str, Any]) -> dict:
    unknown = sorted(set(value) - set(STRUCTURED_KEYS))
    if unknown:
        raise APIError(f"structured_outputs.{unknown[0]} is not supported by dsv3 (it takes "
                       f"{', '.join(STRUCTURED_KEYS)})", param="structured_outputs")
    return {k: v for k, v in value.items() if v is not None}


def request_constraint(request, reasoning_end: str | None) -> StructuredOutputsParams | None:
    """The constraint a completion or chat request asks for (None: free text); 400 for two at once or a
    field dsv3 does not honour."""
    sources: list[tuple[str, dict]] = []
    if request.response_format:
        spec = _from_response_format(request.response_format)
        if spec is not None:
            sources.append(("response_format", spec))
    if request.structured_outputs:
        sources.append(("structured_outputs", _from_structured_outputs(request.structured_outputs)))
    for field, key in GUIDED_FIELDS.items():
        value = getattr(request, field)
        if value is not None:
            sources.append((field, {key: value}))
    if request.guided_whitespace_pattern is not None:
        raise APIError("guided_whitespace_pattern is not supported by dsv3 (structured_outputs."
                       "disable_any_whitespace turns free whitespace off)", param="guided_whitespace_pattern")
    if request.guided_decoding_backend not in (None, "auto", "xgrammar"):
        raise APIError(f"guided_decoding_backend {request.guided_decoding_backend!r}: dsv3 has only xgrammar",
                       param="guided_decoding_backend")
    if not sources:
        return None
    if len(sources) > 1:
        raise APIError(f"{sources[0][0]} and {sources[1][0]} both constrain the output: send one",
                       param=sources[1][0])
    field, spec = sources[0]
    return _params(spec, field, reasoning_end)


def _params(spec: dict, field: str, reasoning_end: str | None) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**spec, reasoning_end=reasoning_end)
    except (TypeError, ValueError) as e:
        raise APIError(f"{field}: {e}", param=field) from None


# ------------------------------------------------------------------------------------------------ tools

def _call_format(name: str, parameters: dict | None, parser: str) -> dict:
    """One tool call of `name` in the parser's format, as structural-tag elements."""
    import xgrammar as xgr

    # compact arguments (", " and ": " as separators, as DeepSeek writes them): free whitespace could loop
    schema = json.dumps(parameters if parameters else {"type": "object"})
    try:
        arguments = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    except Exception as e:  # xgrammar's errors for a schema it cannot compile
        raise APIError(f"tools: the parameters of {name!r} are not a usable JSON schema: {e}", param="tools") from None
    if parser == "deepseek_v31":
        head, tail = f"{CALL_BEGIN}{name}{SEP}", CALL_END
    else:
        head, tail = f"{CALL_BEGIN}function{SEP}{name}\n```json\n", f"\n```{CALL_END}"
    return {"type": "sequence", "elements": [{"type": "const_string", "value": head},
                                             {"type": "grammar", "grammar": arguments},
                                             {"type": "const_string", "value": tail}]}


def tool_call_constraint(tools: list[dict], tool_choice, parser: str,
                         reasoning_end: str | None) -> StructuredOutputsParams:
    """A grammar that makes the model call a tool: one of `tools` ("required", one or more calls) or the
    named function (exactly one call), in the parser's format."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise APIError(f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
        calls = _call_format(name, chosen[0]["function"].get("parameters"), parser)
    else:
        one = [_call_format(t["function"]["name"], t["function"].get("parameters"), parser) for t in tools]
        calls = {"type": "plus", "content": one[0] if len(one) == 1 else {"type": "or", "elements": one}}
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": CALLS_BEGIN}, calls, {"type": "const_string", "value": CALLS_END}]}}
    return StructuredOutputsParams(structural_tag=json.dumps(tag), reasoning_end=reasoning_end)
