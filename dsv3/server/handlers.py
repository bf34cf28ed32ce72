"""/v1/completions and /v1/chat/completions: requests -> engine requests -> OpenAI responses or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dsv3.errors import Dsv3Error, EngineRequestError, RequestError
from dsv3.server.chat_template import ChatTemplate, no_template_error
from dsv3.server.constraints import request_constraint, tool_call_constraint
from dsv3.server.metrics import ServerMetrics
from dsv3.server.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    TokenizeRequest,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
    sampling_kwargs,
)
from dsv3.server.reasoning import THINK_END, ReasoningStream, reasoning_expected, split_reasoning
from dsv3.server.render_pool import RenderPool
from dsv3.server.runner import RequestGroup, ServerShuttingDown, cancel_on_disconnect
from dsv3.server.tool_parser import ToolCallStream, call_format, parse_tool_calls

log = logging.getLogger("dsv3.server")


def stream_error(error: Exception) -> str:
    """An SSE event with OpenAI's error body, for a failure after the stream's 200 went out."""
    if isinstance(error, ServerShuttingDown):
        api_error = APIError(str(error), status=503)
    elif isinstance(error, RequestError):
        api_error = APIError(str(error), param=error.param)
    elif isinstance(error, Dsv3Error):
        api_error = APIError(str(error), status=500)
    else:
        log.error("a stream failed", exc_info=error)
        api_error = APIError(f"the server failed on this request: {type(error).__name__}: {error}", status=500)
    return json.dumps(api_error.body())


@dataclass
class ServerSettings:
    """What `dsv3 serve` was started with (besides the engine)."""

    model_name: str
    checkpoint: str
    chat_template: ChatTemplate | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = None
    max_request_bytes: int = 16 << 20
    chat_template_timeout: float = 10.0
    request_body_timeout: float = 30.0
    max_seqs_per_request: int = 256  # prompts x n
    max_tokens_per_request: int = 1 << 20  # (prompt + max_tokens) x n, summed over the prompts
    allowed_hosts: list[str] | None = None  # Host header names answered (None: any)
    allowed_origins: list[str] | None = None  # pages that may read answers (CORS); None: none
    max_waiting_requests: int | None = None  # more requests without a first token get 503; None: no cap
    log_requests: bool = True  # one log line per request
    #: seconds a 503 for a full queue tells the client to wait (Retry-After)
    retry_after: int = 1


class OpenAIServing:
    """Turns OpenAI requests into engine requests and their outputs into OpenAI responses."""

    def __init__(self, engine, settings: ServerSettings, metrics: ServerMetrics):
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        # CPU work stays off the event loop (it answers /health and every stream meanwhile): tokenizing in
        # threads (the tokenizer lets go of the GIL), chat templates in worker processes bounded in time
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="dsv3-tokenize")
        max_chars = self.max_model_len * (self.tokenizer.max_token_chars or 0) or 8 * settings.max_request_bytes
        self.renderer = None if settings.chat_template is None else RenderPool(
            settings.chat_template, settings.chat_template_timeout, max_chars)
        self.groups: weakref.WeakSet[RequestGroup] = weakref.WeakSet()  # the requests in flight
        self.draining = False

    def end_all(self) -> None:
        """The shutdown grace period is over: every request still in flight ends now, explicitly (a stream
        with a final chunk per choice, finish_reason "abort", an error event and [DONE]; others a 503)."""
        error = ServerShuttingDown("the server is shutting down and its grace period (--shutdown-timeout) ended "
                                   "before this request finished")
        for group in list(self.groups):
            group.end(error)
        if self.renderer is not None:  # a template still rendering stops too
            self.renderer.close()

    async def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ checks

    def check_request(self, request) -> None:
        """The model name (404 for another) and the fields dsv3 cannot honour (400, never silently ignored)."""
        if self.draining:
            raise APIError("the server is shutting down: it takes no new requests", status=503)
        if request.model and request.model != self.settings.model_name:
            raise APIError(f"the model {request.model!r} does not exist (this server serves "
                           f"{self.settings.model_name!r})", status=404, param="model")
        if request.logit_bias:
            raise APIError("logit_bias is not supported by dsv3", param="logit_bias")
        unsupported = request.unsupported_field()
        if unsupported:
            raise APIError(f"{unsupported} is not supported by dsv3", param=unsupported)
        if getattr(request, "suffix", None):
            raise APIError("suffix (fill in the middle) is not supported by dsv3", param="suffix")

    def check_sequences(self, num_prompts: int, n: int) -> None:
        """400 for a request of more sequences (prompts x n) than --max-seqs-per-request."""
        limit = self.settings.max_seqs_per_request
        if num_prompts * n > limit:
            raise APIError(f"this request asks for {num_prompts * n} sequences ({num_prompts} prompts x n={n}); "
                           f"the limit per request is {limit} (--max-seqs-per-request)",
                           param="n" if n > 1 else "prompt")

    def check_tokens(self, prompts: list[list[int]], n: int, max_tokens: int | None) -> None:
        """400 for a request whose sequences may hold more tokens (prompt + max_tokens, each; without
        max_tokens, up to the context) than --max-tokens-per-request."""
        total = sum(self.max_model_len if max_tokens is None else len(ids) + max_tokens for ids in prompts) * n
        limit = self.settings.max_tokens_per_request
        if total > limit:
            generated = "up to the context" if max_tokens is None else f"max_tokens={max_tokens}"
            raise APIError(f"this request may take {total} tokens ({len(prompts)} prompts of {sum(map(len, prompts))} "
                           f"tokens in all, plus {generated}, times n={n}); the limit per request is "
                           f"{limit} (--max-tokens-per-request): lower max_tokens, n or the prompts",
                           param="max_tokens")

    def sampling_params(self, request, max_tokens: int | None, logprobs: int | None, constraint=None):
        from dsv3.serving.params import SamplingParams

        try:
            return SamplingParams(**sampling_kwargs(request, max_tokens, logprobs), structured_outputs=constraint)
        except RequestError as e:
            raise APIError(str(e), param=e.param) from None

    async def encode(self, texts: list[str], param: str, add_bos: bool | None = None) -> list[list[int]]:
        """Token ids of each text, tokenized in a thread; 400 before any tokenizing where the length of a
        text alone proves it cannot fit the context."""
        for text in texts:
            at_least = self.tokenizer.min_tokens(text)
            if at_least >= self.max_model_len:
                raise APIError(f"the prompt is {len(text)} characters, so at least {at_least} tokens, and this "
                               f"model's context is {self.max_model_len} tokens: shorten the prompt", param=param)

        def encode_all() -> list[list[int]]:
            return [self.tokenizer.encode(text, add_bos=add_bos) for text in texts]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, encode_all)
        except Dsv3Error as e:  # text the tokenizer refuses (not valid UTF-8)
            raise APIError(str(e), param=param) from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token ids the tokenizer can decode (/detokenize: not an engine request)."""
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"{param} token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def check_prompts(self, prompts: list[list[int]], params, prompt_param: str) -> None:
        """Each prompt with its params by the engine's rules (LLMEngine.check_request, the one owner): a 400
        naming the field (`prompt_param` for the prompt) before anything runs, a stream's 200 included."""
        for ids in prompts:
            try:
                self.engine.check_request(ids, params)
            except RequestError as e:
                raise APIError(str(e), param=prompt_param if e.param == "prompt" else e.param) from None

    # ------------------------------------------------------------------------------------- completions

    async def completions(self, request: CompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        self.check_sequences(len(prompt), request.n)
        encoded = iter(await self.encode([p for p in prompt if isinstance(p, str)], "prompt"))
        prompts = [next(encoded) if isinstance(p, str) else list(p) for p in prompt]
        params = self.sampling_params(request, request.max_tokens, request.logprobs, request_constraint(request, None))
        echo_logprobs = request.echo and request.logprobs is not None
        if echo_logprobs and params.prompt_logprobs is None:  # echo's log-probabilities: the prompt's
            params.prompt_logprobs = request.logprobs
        self.check_prompts(prompts, params, "prompt")
        self.check_tokens(prompts, request.n, request.max_tokens)
        echo = [(p if isinstance(p, str) else self.tokenizer.decode(p)) if request.echo else "" for p in prompt]

        def logprobs(output, completion, start: int, offset: int) -> CompletionLogprobs | None:
            generated = self._completion_logprobs(completion, start, request.logprobs, offset)
            if not echo_logprobs or start > 0:
                return generated
            out = self._echo_logprobs(output, request.logprobs)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(out, name).extend(getattr(generated, name))
            return out

        def respond(finals: list, response_id: str) -> CompletionResponse:
            choices = [CompletionChoice(index=i * request.n + completion.index, text=echo[i] + completion.text,
                                        logprobs=logprobs(output, completion, 0, len(echo[i])),
                                        prompt_logprobs=self._prompt_logprobs(output, request.prompt_logprobs),
                                        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
                       for i, output in enumerate(finals) for completion in output.outputs]
            return CompletionResponse(id=response_id, model=self.settings.model_name, choices=choices,
                                      usage=self._usage(finals))

        return await self._run(raw, request, "cmpl-", prompts, params, respond,
                               lambda group, response_id: self._completion_stream(group, request, response_id, echo,
                                                                                  logprobs))

    async def _completion_stream(self, group: RequestGroup, request: CompletionRequest, response_id: str,
                                 echo: list[str], logprobs: Callable) -> AsyncIterator[str]:
        created, model = int(time.time()), self.settings.model_name
        sent = {}  # (prompt, completion index) -> (text length, tokens) already streamed
        ended = set()  # completions whose last chunk went out (siblings still running repeat them)
        finals = [None] * len(group.prompts)
        try:
            async with aclosing(group.outputs()) as outputs:
                async for i, output in outputs:
                    if output.finished:
                        finals[i] = output
                    for completion in output.outputs:
                        key = (i, completion.index)
                        if key in ended:
                            continue
                        text_len, num_tokens = sent.get(key, (0, 0))
                        delta = completion.text[text_len:]
                        first = key not in sent
                        if first:
                            delta = echo[i] + delta
                        if not delta and completion.finish_reason is None:
                            continue
                        sent[key] = (len(completion.text), len(completion.token_ids))
                        if completion.finish_reason is not None:
                            ended.add(key)
                        offset = len(echo[i]) + text_len
                        choice = CompletionChoice(
                            index=i * request.n + completion.index, text=delta,
                            logprobs=logprobs(output, completion, num_tokens, offset),
                            prompt_logprobs=self._prompt_logprobs(output, request.prompt_logprobs) if first else None,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
                        yield CompletionResponse(id=response_id, created=created, model=model,
                                                 choices=[choice]).model_dump_json()
        except Exception as e:  # the stream has started (status 200): the error becomes its last event
            if isinstance(e, ServerShuttingDown):  # each choice still open ends explicitly first
                for key in [(i, c) for i in range(len(group.prompts)) for c in range(request.n)]:
                    if key not in ended:
                        choice = CompletionChoice(index=key[0] * request.n + key[1], text="", finish_reason="abort")
                        yield CompletionResponse(id=response_id, created=created, model=model,
                                                 choices=[choice]).model_dump_json()
            yield stream_error(e)
        else:
            if request.include_usage:
                yield CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                         usage=self._usage(finals)).model_dump_json()
        yield "[DONE]"

    async def _run(self, raw: Request, request: CompletionRequest | ChatCompletionRequest, prefix: str,
                   prompts: list[list[int]], params, respond: Callable[[list, str], BaseModel],
                   stream: Callable[[RequestGroup, str], AsyncIterator[str]]) -> Response:
        """Send one API request's prompts to the engine under one response id (prefix + random); stream the
        outputs, or wait for all of them and answer respond(finals, response_id) (499 where the client left)."""
        self.check_queue()
        group = RequestGroup(self.engine, random_id(prefix), prompts, params, self.metrics.timer())
        self.groups.add(group)
        response_id = group.ids[0].rsplit("-", 1)[0]
        if self.settings.log_requests:
            log.info("request %s: %d prompt(s) of %s tokens, stream=%s, params: %s", response_id, len(prompts),
                     "/".join(str(len(p)) for p in prompts[:4]) + ("/..." if len(prompts) > 4 else ""),
                     request.stream, params.summary())
        if request.stream:
            return EventSourceResponse(stream(group, response_id), sep="\n")
        finals = await cancel_on_disconnect(raw, self._collect(group))
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(respond(finals, response_id).model_dump())

    # ------------------------------------------------------------------------------- tokenize, detokenize

    async def tokenize(self, request: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the prompt's ids, or the chat prompt's as /v1/chat/completions renders it."""
        if request.model and request.model != self.settings.model_name:
            raise APIError(f"the model {request.model!r} does not exist (this server serves "
                           f"{self.settings.model_name!r})", status=404, param="model")
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give either prompt or messages", param="prompt")
        if request.prompt is not None:
            [ids] = await self.encode([request.prompt], "prompt", add_bos=request.add_special_tokens)
        else:
            if self.settings.chat_template is None:
                raise no_template_error(self.settings.checkpoint)
            tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
            text = await self.renderer.render([m.template_dict() for m in request.messages], tools=tools,
                                              add_generation_prompt=request.add_generation_prompt,
                                              **(request.chat_template_kwargs or {}))
            [ids] = await self.encode([text], "messages", add_bos=False)
        pieces = self.tokenizer.backend_tokenizer.id_to_token  # the vocabulary's own strings, as vLLM returns
        strs = [pieces(i) for i in ids] if request.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        if request.model and request.model != self.settings.model_name:
            raise APIError(f"the model {request.model!r} does not exist (this server serves "
                           f"{self.settings.model_name!r})", status=404, param="model")
        self.check_token_ids(request.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}

    @property
    def num_waiting(self) -> int:
        """Requests in flight that have no output yet (queued, or in their prefill)."""
        return sum(1 for group in list(self.groups) if not group.started and group.timer is not None)

    def check_queue(self) -> None:
        """503 with Retry-After when --max-waiting-requests requests already wait: shed load, stay healthy."""
        cap = self.settings.max_waiting_requests
        if cap is not None and self.num_waiting >= cap:
            raise APIError(f"the server is at capacity: {cap} requests are already waiting "
                           "(--max-waiting-requests); retry later", status=503,
                           headers={"Retry-After": str(self.settings.retry_after)})

    async def _collect(self, group: RequestGroup) -> list:
        finals = [None] * len(group.prompts)
        try:
            async with aclosing(group.outputs()) as outputs:
                async for i, output in outputs:
                    finals[i] = output
        except EngineRequestError as e:
            raise APIError(str(e), status=500) from None
        except ServerShuttingDown as e:
            raise APIError(str(e), status=503) from None
        return finals

    # -------------------------------------------------------------------------------------------- chat

    async def chat(self, request: ChatCompletionRequest, raw: Request) -> Response:
        self.check_request(request)
        if self.renderer is None:
            raise no_template_error(self.settings.checkpoint)
        parse_tools = self._tool_parsing(request)
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        messages = [m.template_dict() for m in request.messages]
        text = await self.renderer.render(messages, tools, request.add_generation_prompt,
                                          request.chat_template_kwargs)
        [prompt] = await self.encode([text], "messages", add_bos=False)
        self.check_sequences(1, request.n)
        # where the output starts with reasoning, the parser splits it off and a constraint starts after it
        thinks = reasoning_expected(self.settings.reasoning_parser, text, request.chat_template_kwargs or {})
        reasoning_end = THINK_END if thinks else None
        constraint = request_constraint(request, reasoning_end)
        if parse_tools and request.tool_choice not in (None, "auto"):
            if constraint is not None:
                raise APIError("a forced tool call (tool_choice) and a response format both constrain the output: "
                               "send one", param="tool_choice")
            constraint = tool_call_constraint(tools, request.tool_choice, self.settings.tool_call_parser,
                                              reasoning_end)
        params = self.sampling_params(request, request.requested_max_tokens, request.logprobs_count, constraint)
        self.check_prompts([prompt], params, "messages")
        self.check_tokens([prompt], request.n, request.requested_max_tokens)

        def respond(finals: list, response_id: str) -> ChatCompletionResponse:
            choices = []
            for completion in finals[0].outputs:
                reasoning, content = None, completion.text
                if thinks:
                    reasoning, content = split_reasoning(content)
                calls = []
                if parse_tools:
                    content, calls = parse_tool_calls(content or "", call_format(self.settings.tool_call_parser))
                finish_reason = ("tool_calls" if calls and completion.finish_reason == "stop"
                                 else completion.finish_reason)
                choices.append(ChatChoice(
                    index=completion.index,
                    message=ChatResponseMessage(content=content, reasoning_content=reasoning,
                                                tool_calls=calls or None),
                    logprobs=self._chat_logprobs(completion, 0, request.logprobs_count),
                    finish_reason=finish_reason, stop_reason=completion.stop_reason))
            return ChatCompletionResponse(id=response_id, model=self.settings.model_name, choices=choices,
                                          usage=self._usage(finals),
                                          prompt_logprobs=self._prompt_logprobs(finals[0], request.prompt_logprobs))

        return await self._run(raw, request, "chatcmpl-", [prompt], params, respond,
                               lambda group, response_id: self._chat_stream(group, request, response_id, parse_tools,
                                                                            thinks))

    def _tool_parsing(self, request: ChatCompletionRequest) -> bool:
        """Whether this request's output is parsed for tool calls; 400 for what dsv3 cannot honour."""
        choice = request.tool_choice
        if not request.tools or choice == "none":
            if isinstance(choice, dict) or choice == "required":
                raise APIError(f"tool_choice {choice!r} needs tools", param="tool_choice")
            return False
        if not self.settings.tool_call_parser:
            raise APIError("tools need the server started with --tool-call-parser deepseek_v3 (or deepseek_v31); "
                           "--enable-auto-tool-choice is accepted beside it, as vLLM has it", param="tools")
        if isinstance(choice, dict) and (choice.get("type") != "function" or
                                         not isinstance((choice.get("function") or {}).get("name"), str)):
            raise APIError("tool_choice must be 'none', 'auto', 'required' or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        return True

    async def _chat_stream(self, group: RequestGroup, request: ChatCompletionRequest, response_id: str,
                           parse_tools: bool, thinks: bool) -> AsyncIterator[str]:
        created, model = int(time.time()), self.settings.model_name

        def chunk(index: int, delta: DeltaMessage, finish_reason=None, stop_reason=None, logprobs=None) -> str:
            choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                      stop_reason=stop_reason)
            return ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice],
                                       usage=None).model_dump_json()

        for index in range(request.n):
            yield chunk(index, DeltaMessage(role="assistant", content=""))
        sent: dict[int, tuple[int, int]] = {}
        ended: set[int] = set()  # choices whose last chunk went out (siblings still running repeat them)
        reasoning = {i: ReasoningStream() for i in range(request.n)} if thinks else None
        fmt = call_format(self.settings.tool_call_parser or "")
        tools = {i: ToolCallStream(fmt, stream_arguments=True) for i in range(request.n)} if parse_tools else None
        final = None
        try:
            async with aclosing(group.outputs()) as outputs:
                async for _, output in outputs:
                    final = output
                    for completion in output.outputs:
                        i = completion.index
                        if i in ended:
                            continue
                        text_len, num_tokens = sent.get(i, (0, 0))
                        new_text = completion.text[text_len:]
                        sent[i] = (len(completion.text), len(completion.token_ids))
                        done = completion.finish_reason is not None
                        delta = self._split(new_text, done, reasoning and reasoning[i], tools and tools[i])
                        logprobs = self._chat_logprobs(completion, num_tokens, request.logprobs_count)
                        if delta is not None or (logprobs and logprobs.content):
                            yield chunk(i, delta or DeltaMessage(), logprobs=logprobs)
                        if done:
                            ended.add(i)
                            reason = completion.finish_reason
                            if tools and tools[i].num_calls and reason == "stop":
                                reason = "tool_calls"
                            yield chunk(i, DeltaMessage(), reason, completion.stop_reason)
        except Exception as e:  # the stream has started (status 200): the error becomes its last event
            if isinstance(e, ServerShuttingDown):  # each choice still open ends explicitly first
                for i in range(request.n):
                    if i not in ended:
                        yield chunk(i, DeltaMessage(), "abort")
            yield stream_error(e)
        else:
            if request.include_usage:
                yield ChatCompletionChunk(id=response_id, created=created, model=model, choices=[],
                                          usage=self._usage([final])).model_dump_json()
        yield "[DONE]"

    @staticmethod
    def _split(text: str, done: bool, reasoning: ReasoningStream | None,
               tools: ToolCallStream | None) -> DeltaMessage | None:
        """A new piece of output through the parsers: reasoning, content and tool-call deltas (None if empty)."""
        pieces = [(None, text)]
        if reasoning is not None:
            pieces = [reasoning.feed(text)] + ([reasoning.finish()] if done else [])
        thought = "".join(r or "" for r, _ in pieces)
        content = "".join(c or "" for _, c in pieces)
        calls = []
        if tools is not None:
            results = [tools.feed(content)] + ([tools.finish()] if done else [])
            content = "".join(c or "" for c, _ in results)
            calls = [d for _, deltas in results for d in deltas]
        if not (thought or content or calls):
            return None
        return DeltaMessage(reasoning_content=thought or None, content=content or None, tool_calls=calls or None)

    # ------------------------------------------------------------------------------------ logprobs, usage

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _top(self, entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda item: -item[1])[:k]

    def _chat_logprobs(self, completion, start: int, k: int | None) -> ChatLogprobs | None:
        if k is None or completion.logprobs is None:
            return None
        content = []
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:], strict=False):
            text = self._token(token_id)
            content.append(TokenLogprob(
                token=text, logprob=max(entry.get(token_id, -9999.0), -9999.0), bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=(t := self._token(i)), logprob=max(lp, -9999.0), bytes=list(t.encode()))
                              for i, lp in self._top(entry, k)]))
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, completion, start: int, k: int | None, offset: int) -> CompletionLogprobs | None:
        if k is None or completion.logprobs is None:
            return None
        out = CompletionLogprobs()
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:], strict=False):
            text = self._token(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(max(entry.get(token_id, -9999.0), -9999.0))
            out.top_logprobs.append({self._token(i): max(lp, -9999.0) for i, lp in self._top(entry, k)})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _echo_logprobs(self, output, k: int) -> CompletionLogprobs:
        """The echoed prompt's part of a completion's logprobs (the first token has none, as OpenAI's)."""
        out, offset = CompletionLogprobs(), 0
        for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs or ()):
            text = self._token(token_id)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                values = entry[0]
                out.token_logprobs.append(max(values[token_id], -9999.0))
                out.top_logprobs.append({self._token(i): max(lp, -9999.0) for i, lp in self._top(values, k)})
        return out

    def _prompt_logprobs(self, output, k: int | None) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} for the top k and the prompt's own token."""
        if k is None or output.prompt_logprobs is None:
            return None
        result = []
        for position, entry in enumerate(output.prompt_logprobs):
            if entry is None:
                result.append(None)
                continue
            values, rank = entry
            token = output.prompt_token_ids[position]
            top = dict(self._top(values, k))
            ranked = {i: r + 1 for r, (i, _) in enumerate(self._top(values, len(values)))}
            result.append({str(i): {"logprob": max(lp, -9999.0), "rank": rank if i == token else ranked[i],
                                    "decoded_token": self._token(i)}
                           for i, lp in values.items() if i in top or i == token})
        return result

    @staticmethod
    def _usage(finals: list) -> UsageInfo:
        finals = [f for f in finals if f is not None]
        prompt = sum(len(f.prompt_token_ids) for f in finals)
        completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
        cached = sum(f.num_cached_tokens for f in finals)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details={"cached_tokens": cached} if cached else None)

