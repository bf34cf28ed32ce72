"""`dsv3 serve`: an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics) over the serving engine."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path

from dsv3.checks import check_int
from dsv3.commands.args import add_engine_arguments, engine_args
from dsv3.errors import UsageError
from dsv3.server.reasoning import REASONING_PARSERS
from dsv3.server.tool_parser import TOOL_CALL_PARSERS

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="the checkpoint directory, as `vllm serve MODEL` "
                   "takes it (the same as --ckpt / --model)")
    p.add_argument("--model", dest="model_flag", metavar="DIR", help="vLLM's name for --ckpt")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling of requests that bring no seed "
                   "(default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                   "only; 0.0.0.0 listens on every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients send and /v1/models "
                   "lists (default: --ckpt as given, or 'tiny')")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every /v1 route, "
                   "/tokenize and /detokenize (default: $DSV3_API_KEY, else $VLLM_API_KEY; none when unset)")
    p.add_argument("--allowed-hosts", metavar="NAMES", help="Host header names the server answers to, comma-separated "
                   "or a JSON list; '*' any (default: on a loopback --host, only localhost, 127.0.0.1 and ::1, "
                   "against DNS rebinding; elsewhere any)")
    p.add_argument("--allowed-origins", metavar="ORIGINS", help="web origins allowed to read answers (CORS), "
                   "a JSON list as vLLM takes it or comma-separated; '*' any (default: none, CORS off)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the "
                   "checkpoint's (tokenizer_config.json chat_template)")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, help="return the text up to </think> as "
                   "reasoning_content (deepseek_r1: DeepSeek-R1; deepseek_v3: V3.1 with chat_template_kwargs "
                   "thinking on)")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, help="parse the model's tool-call tokens "
                   "into tool_calls (deepseek_v3: V3's and R1's format; deepseek_v31: V3.1's)")
    p.add_argument("--enable-auto-tool-choice", action="store_true", help="vLLM's switch for tool_choice 'auto'; "
                   "dsv3 parses tool calls whenever --tool-call-parser is given, and takes it beside it")
    p.add_argument("--max-waiting-requests", type=int, metavar="N", help="at most N requests wait for their first "
                   "token (queued or in their prefill); more are answered 503 with Retry-After (default: no cap; "
                   "vLLM has no such flag)")
    p.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    p.add_argument("--enable-log-requests", action="store_true", help="a log line per request (the default; "
                   "vLLM's newer spelling)")
    p.add_argument("--uvicorn-log-level", choices=UVICORN_LOG_LEVELS, default="warning",
                   help="uvicorn's log level; info and below print an access line per HTTP request (default warning)")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, metavar="N",
                   help="larger request bodies are refused with 413 (default 16 MiB)")
    p.add_argument("--max-seqs-per-request", type=int, default=256, metavar="N",
                   help="sequences one request may ask for, prompts x n; more is a 400 (default 256)")
    p.add_argument("--max-tokens-per-request", type=int, default=1 << 20, metavar="N",
                   help="tokens one request's sequences may hold, (prompt + max_tokens) x n summed over its prompts; "
                   "more is a 400 (default 1048576)")
    p.add_argument("--chat-template-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a chat template that takes longer to render a request's messages is stopped and the "
                   "request refused with 400 (default 10)")
    p.add_argument("--request-body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request whose body stops arriving for this long is answered 408 (default 30)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long in-flight requests may run before they are aborted "
                   "(default 10)")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from dsv3.api import TINY_CHECKPOINT
    from dsv3.server.app import build_app, serve
    from dsv3.server.chat_template import ChatTemplate, check_template_tokens
    from dsv3.server.cross_site import parse_list
    from dsv3.server.handlers import ServerSettings
    from dsv3.tokenizer import Tokenizer

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_request_bytes < 1024:
        raise UsageError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    if not math.isfinite(args.shutdown_timeout) or args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout must be a finite number of seconds >= 0, got {args.shutdown_timeout}")
    check_int("--max-seqs-per-request", args.max_seqs_per_request, 1)
    check_int("--max-tokens-per-request", args.max_tokens_per_request, 2)
    if not math.isfinite(args.chat_template_timeout) or args.chat_template_timeout <= 0:
        raise UsageError(f"--chat-template-timeout must be a finite number of seconds > 0, got "
                         f"{args.chat_template_timeout}")
    if not math.isfinite(args.request_body_timeout) or args.request_body_timeout <= 0:
        raise UsageError(f"--request-body-timeout must be a finite number of seconds > 0, got "
                         f"{args.request_body_timeout}")
    if args.chat_template and not Path(args.chat_template).is_file():
        raise UsageError(f"--chat-template {args.chat_template}: no such file")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise UsageError(f"--max-waiting-requests must be at least 1, got {args.max_waiting_requests}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise UsageError("--enable-auto-tool-choice needs --tool-call-parser (deepseek_v3 or deepseek_v31)")
    if args.disable_log_requests and args.enable_log_requests:
        raise UsageError("give --disable-log-requests or --enable-log-requests, not both")
    for name in ("model_tag", "model_flag"):
        value = getattr(args, name)
        if value is not None:
            if args.ckpt is not None and args.ckpt != value:
                raise UsageError(f"the model is given twice ({args.ckpt} and {value}): give one of MODEL, --model "
                                 "and --ckpt")
            args.ckpt = value
    if args.node_rank == 0:  # only node 0 serves
        check_address(args.host, args.port)
    if args.config and not args.ckpt:
        raise UsageError("dsv3 serve needs a checkpoint with its tokenizer (--ckpt DIR, or none for the built-in "
                         "tiny one); --config builds random weights without a tokenizer")
    engine_settings = engine_args(args, seed=args.seed)  # every engine flag checked before anything is read
    checkpoint = str(args.ckpt or TINY_CHECKPOINT)
    template = ChatTemplate.load(checkpoint, override=args.chat_template)
    if template is not None:  # before the weights load: a template the tokenizer cannot encode is refused
        # (its notes on tool-call tokens: generate --chat)
        check_template_tokens(template, Tokenizer(checkpoint), timeout=args.chat_template_timeout)
    settings = ServerSettings(
        model_name=args.served_model_name or args.ckpt or "tiny", checkpoint=checkpoint, chat_template=template,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        api_key=api_key(args), max_request_bytes=args.max_request_bytes,
        chat_template_timeout=args.chat_template_timeout, request_body_timeout=args.request_body_timeout,
        max_seqs_per_request=args.max_seqs_per_request, max_tokens_per_request=args.max_tokens_per_request,
        allowed_hosts=allowed_hosts(args), allowed_origins=parse_list("--allowed-origins", args.allowed_origins),
        max_waiting_requests=args.max_waiting_requests, log_requests=not args.disable_log_requests)
    model = engine_settings.build()
    if not model.is_primary:  # a rank torchrun started: it runs the steps rank 0's engine sends
        model.serve_steps()
        return 0
    engine = model.async_engine
    # a rank that fails fails every request; then the server stops (SIGTERM's drain) and exits 1
    engine.loop.on_failure.append(lambda reason: os.kill(os.getpid(), signal.SIGTERM))
    if template is None:
        print(f"dsv3: {checkpoint} has no chat template: /v1/chat/completions answers 400 "
              "(pass --chat-template FILE)", file=sys.stderr)
    app = build_app(engine, settings)
    logging.basicConfig(level=logging.INFO, format="dsv3: %(message)s")
    print(f"dsv3: serving {settings.model_name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if settings.api_key else ''}", file=sys.stderr, flush=True)
    try:
        started = serve(app, args.host, args.port, args.shutdown_timeout, args.uvicorn_log_level)
    finally:
        engine.shutdown()
    return 0 if started and engine.loop.failure is None else 1


def allowed_hosts(args: argparse.Namespace) -> list[str] | None:
    """--allowed-hosts; by default loopback names where the server listens on loopback, else any."""
    from dsv3.server.cross_site import LOOPBACK_NAMES, is_loopback, parse_list

    names = parse_list("--allowed-hosts", args.allowed_hosts)
    if names is None and is_loopback(args.host):
        names = [*LOOPBACK_NAMES, args.host]
    return names


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key or $DSV3_API_KEY without the surrounding whitespace a shell or a key file leaves (clients strip
    it too; kept, it would lock everyone out); one of only whitespace is refused, not taken for no key."""
    key = args.api_key or os.environ.get("DSV3_API_KEY") or os.environ.get("VLLM_API_KEY")
    if key and not key.strip():
        raise UsageError("the API key (--api-key, DSV3_API_KEY or VLLM_API_KEY) is only whitespace")
    return key.strip() if key else None


def check_address(host: str, port: int) -> None:
    """Fail before loading the model when the server could not listen on host:port (taken, or not ours)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None
