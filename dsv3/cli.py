"""The `dsv3` command: one subcommand per module in dsv3/commands/."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import signal
import sys
import threading

from dsv3.errors import Dsv3Error, Terminated

#: subcommand -> (module in dsv3.commands, one-line help)
COMMANDS = {
    "generate": ("generate", "generate text from a prompt, a file of prompts, or an interactive chat"),
    "conformance": ("conformance", "check every backend op against the reference backend and print the matrix"),
    "doctor": ("doctor", "show the device, versions, the backend and precision dsv3 picks, and each op's "
                         "implementation"),
    "convert": ("convert", "convert an FP8 checkpoint to BF16, or to e4m3fnuz for MI300X"),
    "bench": ("bench", "time GEMM, MoE and MLA at the DeepSeek-V3 shapes beside their peers and the roofline"),
    "serve": ("serve", "serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="Run DeepSeek-V3/R1/V2 on NVIDIA, AMD and Ascend accelerators, or on the CPU.",
        epilog="Run 'dsv3 COMMAND --help' for a command's options. Without --ckpt, commands use the "
               "built-in tiny checkpoint.")
    parser.add_argument("--version", action="version", version=f"dsv3 {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = importlib.import_module(f"dsv3.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    with _leave_on_ctrl_c():  # importing torch and the commands takes seconds
        from dsv3.backends.errors import BackendError
        parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args) or 0
    except (Dsv3Error, BackendError) as e:
        return _fail(f"error: {e}", 2)
    except Terminated:
        return _fail("terminated", 143)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `dsv3 generate ... | head -1`: the reader left; stop quietly-ish, exit like SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return _fail("output closed early (broken pipe); stopped", 141)
    except MemoryError:
        return _fail("error: out of host memory", 2)
    except RuntimeError as e:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return _fail(f"error: the device ran out of memory: {str(e).splitlines()[0]}", 2)
        raise


@contextlib.contextmanager
def _leave_on_ctrl_c():
    """Ctrl-C inside: one line and exit 130 at once. A KeyboardInterrupt raised in an import can be swallowed
    by a library's bare `except:` (the command then ran on as if nothing happened), and nothing has been
    written yet, so leaving without unwinding loses nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        _fail("interrupted", 130)
        os._exit(130)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _fail(message: str, code: int) -> int:
    try:
        print(f"dsv3: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass
    return code


def _version() -> str:
    try:
        return importlib.metadata.version("dsv3")
    except importlib.metadata.PackageNotFoundError:
        from dsv3 import __version__

        return __version__
