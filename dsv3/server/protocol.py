"""OpenAI's request and response bodies for /v1/completions, /v1/chat/completions and /v1/models.

Requests accept the fields OpenAI and vLLM accept (unknown fields are ignored, as both servers do); each
range check names the field, so a bad request answers 400 with OpenAI's error body and `param` set.
`sampling_kwargs` maps a request onto the engine's SamplingParams.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_serializer

from dsv3 import __version__

#: The most top log-probabilities a request may ask for per token (OpenAI's limit for top_logprobs).
MAX_LOGPROBS = 20


#: fields OpenAI or vLLM define that dsv3 does not implement, with the value that asks for nothing: any other
#: value is a 400 naming the field (fields neither defines are ignored, as both servers do)
UNSUPPORTED = {
    "best_of": None, "use_beam_search": False, "length_penalty": 1.0, "min_tokens": 0,
    "include_stop_str_in_output": False, "truncate_prompt_tokens": None, "allowed_token_ids": None,
    "bad_words": [], "prompt_embeds": None, "logits_processors": None, "vllm_xargs": None,
    "return_tokens_as_token_ids": False, "prediction": None, "audio": None, "modalities": None,
    "functions": None, "function_call": None, "kv_transfer_params": None, "mm_processor_kwargs": None,
    "documents": None, "continue_final_message": False, "chat_template": None, "priority": 0,
    "spaces_between_special_tokens": True, "web_search_options": None,
}


#: what this build's responses say in `system_fingerprint` (the software that produced them)
SYSTEM_FINGERPRINT = f"dsv3-{__version__}"


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class APIError(Exception):
    """A request that fails with an HTTP status and OpenAI's error body."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 408: "RequestTimeoutError",
             413: "RequestEntityTooLargeError", 415: "UnsupportedMediaTypeError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, message: str, status: int = 400, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.headers = message, status, param, headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "APIError"),
                                             param=self.param, code=self.status)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------------------------------- requests

def _not_bool(value):
    """JSON's true and false are not numbers (pydantic would take them for 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share, with vLLM's names and ranges."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: Int = Field(1, ge=1, le=64)
    temperature: Float | None = Field(None, ge=0.0, le=2.0)
    top_p: Float | None = Field(None, gt=0.0, le=1.0)
    top_k: Int | None = Field(None, ge=-1)
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: Float | None = Field(None, gt=0.0)
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # structured output (dsv3.server.constraints): OpenAI's field, vLLM's, and vLLM's older ones
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # accepted so that asking for them is a clear 400 rather than silently ignored
    logit_bias: dict[str, float] | None = None

    def unsupported_field(self) -> str | None:
        """The first field OpenAI or vLLM defines that this request sets and dsv3 does not implement."""
        extra = self.model_extra or {}
        if extra.get("best_of") not in (None, self.n):
            return "best_of"
        return next((name for name, neutral in UNSUPPORTED.items()
                     if name != "best_of" and extra.get(name, neutral) not in (neutral, None)), None)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is a string, a list of strings, a token list or a list of token lists."""

    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = Field(16, ge=0)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessage(BaseModel):
    """One input message; fields beyond OpenAI's (e.g. reasoning_content) pass through to the template."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict:
        """The message as the chat template sees it: content parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"message content part of type {part.get('type')!r} is not supported "
                                   "(only text parts)", param="messages")
                texts.append(part["text"])
            message["content"] = "".join(texts)
        elif self.content is None and self.role != "assistant":
            message["content"] = ""
        elif self.content is None:
            message["content"] = None
        if message["role"] == "developer":  # OpenAI's newer name for the system role
            message["role"] = "system"
        return message


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=0)
    max_completion_tokens: Int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def sampling_kwargs(request: SamplingFields, max_tokens: int | None, logprobs: int | None) -> dict:
    """The engine's SamplingParams fields for a request; None leaves the checkpoint's default to the engine."""
    kwargs = dict(n=request.n, max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                  top_k=request.top_k, min_p=request.min_p, seed=request.seed, stop=request.stop,
                  stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, logprobs=logprobs,
                  repetition_penalty=request.repetition_penalty, skip_special_tokens=request.skip_special_tokens,
                  prompt_logprobs=request.prompt_logprobs,
                  presence_penalty=request.presence_penalty or 0.0,
                  frequency_penalty=request.frequency_penalty or 0.0)
    return kwargs


# --------------------------------------------------------------------------------------------- responses

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or one streamed chunk of it (OpenAI streams the same object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call_"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class Delta(BaseModel):
    """A streamed piece: only the fields it carries are sent (those left None are dropped)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(Delta):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Delta):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(Delta):
    """A streamed piece of a message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str = SYSTEM_FINGERPRINT
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsv3"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
