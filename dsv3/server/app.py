"""The FastAPI app: routes, the API key, request size limits and OpenAI-shaped errors.

Every /v1 route needs `Authorization: Bearer KEY` when the server has a key; /health and /metrics stay
open. A body is read up to the size limit (413 past it) and validated by the pydantic models; every error a
client can cause answers with OpenAI's body {"error": {"message", "type", "param", "code"}}, and an engine
failure in one request is that request's 500 while the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal

import uvicorn
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from dsv3 import __version__
from dsv3.errors import Dsv3Error, RequestError
from dsv3.server.cross_site import HostCheck, check_json_body
from dsv3.server.handlers import OpenAIServing, ServerSettings
from dsv3.server.metrics import ServerMetrics
from dsv3.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from dsv3.server.runner import ServerShuttingDown

log = logging.getLogger("dsv3.server")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


#: what a field that takes several shapes accepts, for its type errors
UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
    "tool_choice": "must be 'none', 'auto', 'required' or {\"type\": \"function\", ...}",
}


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried (str, list[int], literal[...]) in the error location."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """One line for pydantic's first complaint, and the top-level field it names (OpenAI's `param`)."""
    first = error.errors()[0]
    location = list(first["loc"])
    param = next((str(part) for part in location if isinstance(part, str)), None)
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if any(_is_union_tag(part) for part in location):
        location = location[:next(i for i, part in enumerate(location) if _is_union_tag(part))]
        field = next((str(part) for part in reversed(location) if isinstance(part, str)), "")
        where = ".".join(str(part) for part in location)
        return f"{where} {UNION_HINTS.get(field, 'has the wrong type')} (got {got})", param
    where = ".".join(str(part) for part in location)
    if first["type"] == "missing":
        return f"{where} is required", param
    return (f"{where}: {first['msg']} (got {got})" if where else first["msg"]), param


async def read_json(request: Request, model: type[BaseModel], limit: int, timeout: float) -> BaseModel:
    """The request body as `model`: 413 above `limit` bytes, 408 where the upload stalls for `timeout`
    seconds, 400 for malformed JSON or fields."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is {declared} bytes; the limit is {limit}", status=413)
    check_json_body(request.headers.get("content-type"))
    body = bytearray()
    pieces = request.stream()
    while True:
        try:
            piece = await asyncio.wait_for(anext(pieces), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(f"the request body stalled: nothing arrived for {timeout:g} s after {len(body)} bytes "
                           "(--request-body-timeout)", status=408) from None
        except ClientDisconnect:
            raise APIError("the client disconnected while sending the request body", status=499) from None
        body += piece
        if len(body) > limit:
            raise APIError(f"the request body is over the limit of {limit} bytes", status=413)
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError("the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:  # malformed, not UTF-8, or an integer of thousands of digits
        raise APIError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    # only an escape can bring a lone surrogate (UTF-8 cannot encode one), and only brackets nest: most
    # bodies need no walk
    if b"\\u" in body or body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        check_body(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(message, param=param) from None


#: JSON nested deeper than this is refused (a tool's parameter schema needs a few tens of levels at most)
MAX_JSON_DEPTH = 100


def check_body(data) -> None:
    """400 naming the first place where the body is nested deeper than MAX_JSON_DEPTH, or a string (or key)
    holds a lone UTF-16 surrogate: that is not text, so it could be neither tokenized nor sent back."""
    stack = [(data, ())]
    while stack:
        value, path = stack.pop()
        where = ".".join(map(str, path))
        if len(path) > MAX_JSON_DEPTH:
            raise APIError(f"{where[:80]}...: the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                           param=str(path[0]))
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(f"{where or 'the body'}: a lone UTF-16 surrogate ({value[e.start]!r}) at character "
                               f"{e.start} is not valid Unicode text", param=str(path[0]) if path else None) from None
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value) if isinstance(item, (str, list, dict)))
        elif isinstance(value, dict):
            stack.extend((key, path) for key in value)
            stack.extend((item, (*path, key)) for key, item in value.items())


def build_app(engine, settings: ServerSettings) -> FastAPI:
    """The server's app around a loaded AsyncEngine."""
    metrics = ServerMetrics(engine.stats, settings.model_name)
    serving = OpenAIServing(engine, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await serving.close()

    app = FastAPI(title="dsv3", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = serving
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    if settings.allowed_hosts:
        app.add_middleware(HostCheck, allowed=settings.allowed_hosts)

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    settings.api_key.strip().encode()):
            raise APIError("missing or wrong API key: send the header 'Authorization: Bearer KEY'", status=401)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError):
        return error_response(APIError(str(error), param=error.param))

    @app.exception_handler(ServerShuttingDown)
    async def on_shutdown(request: Request, error: ServerShuttingDown):
        return error_response(APIError(str(error), status=503))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException):
        return error_response(APIError(f"{request.method} {request.url.path}: {error.detail}",
                                       status=error.status_code))

    @app.exception_handler(Exception)
    async def on_failure(request: Request, error: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        message = str(error) if isinstance(error, Dsv3Error) else f"{type(error).__name__}: {error}"
        return error_response(APIError(f"the server failed on this request: {message}", status=500))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        """200 while the engine can serve; 503 once its loop has died (a restart is needed)."""
        error = engine.error
        if error is not None:
            return error_response(APIError(f"the engine cannot serve: {error}", status=503))
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # SageMaker's health check, as vLLM answers it
        return await health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(request: Request):
        body = await read_json(request, TokenizeRequest, settings.max_request_bytes, settings.request_body_timeout)
        return await serving.tokenize(body)

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(request: Request):
        body = await read_json(request, DetokenizeRequest, settings.max_request_bytes,
                               settings.request_body_timeout)
        return serving.detokenize(body)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    card = ModelCard(id=settings.model_name, root=settings.checkpoint, max_model_len=serving.max_model_len)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str):
        if name != settings.model_name:
            raise APIError(f"the model {name!r} does not exist (this server serves {settings.model_name!r})",
                           status=404, param="model")
        return card.model_dump()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        body = await read_json(request, CompletionRequest, settings.max_request_bytes,
                               settings.request_body_timeout)
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        body = await read_json(request, ChatCompletionRequest, settings.max_request_bytes,
                               settings.request_body_timeout)
        return await serving.chat(body, request)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, except that the SIGTERM or SIGINT it shut down gracefully for is not raised again
    afterwards (uvicorn re-raises it, which makes the process exit 143 instead of 0)."""

    @contextlib.contextmanager
    def capture_signals(self):
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        """uvicorn's graceful shutdown (stop accepting, wait for in-flight requests), with new requests on
        open connections refused (503) and, shortly before the timeout, every request still in flight ended
        explicitly (OpenAIServing.end_all) rather than cut off mid-stream."""
        serving = self.config.app.state.serving
        serving.draining = True
        timeout = self.config.timeout_graceful_shutdown
        end_requests = asyncio.get_running_loop().call_later(max(timeout - min(1.0, timeout / 2), 0.0),
                                                             serving.end_all)
        try:
            await super().shutdown(sockets)
        finally:
            end_requests.cancel()


def serve(app: FastAPI, host: str, port: int, shutdown_timeout: float, log_level: str = "warning") -> bool:
    """Serve until SIGTERM or Ctrl-C: then stop accepting, let in-flight requests (streams too) run up to
    `shutdown_timeout` seconds, end what is left explicitly (which aborts its engine requests) and return.
    Returns False if the server could not start (the port is taken, say)."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # streams finish within the timeout instead of ending at once
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=log_level in ("info", "debug", "trace"),
                            timeout_graceful_shutdown=shutdown_timeout)
    server = _Server(config)
    server.run()
    return server.started
