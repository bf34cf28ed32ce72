"""`dsv3 generate`: a prompt, a file of prompts (one per line, batched) or an interactive chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv3.api import TINY_CHECKPOINT
from dsv3.checks import check_sampling
from dsv3.commands.args import add_engine_arguments, engine_args, load_from_args
from dsv3.config import load_config
from dsv3.distributed import is_primary
from dsv3.errors import Dsv3Error, UsageError
from dsv3.serving.params import SamplingParams
from dsv3.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="text to continue")
    p.add_argument("--input-file", metavar="FILE", help="one prompt per line, generated as one batch "
                   "(- reads standard input)")
    p.add_argument("--interactive", action="store_true", help="chat in the terminal (/clear resets, /exit quits)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the checkpoint's "
                   "(for --chat and --interactive)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_engine_arguments(p)


def run(args: argparse.Namespace) -> int:
    modes = sum(bool(x) for x in (args.prompt, args.input_file, args.interactive))
    if modes != 1:
        raise Dsv3Error("give exactly one of: a prompt, --input-file FILE, --interactive")
    prompts = [args.prompt] if args.prompt else None
    if args.input_file and is_primary():  # under torchrun only rank 0 runs the engine, and reads
        prompts = read_prompts(Path(args.input_file))
    preflight(args, prompts)
    model = load_from_args(args)
    if not model.is_primary:  # a rank torchrun started: it runs the steps rank 0's engine sends
        model.serve_steps()
        return 0
    if model.tokenizer is None:
        raise Dsv3Error("generate needs a checkpoint with a tokenizer (--config runs synthetic weights)")
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    template = chat_template(args) if args.chat or args.interactive else None
    if args.interactive:
        return chat_loop(model, sampling, template)
    inputs = prompts
    if args.chat:
        inputs = [template.render([{"role": "user", "content": p}]) for p in prompts]
    if len(inputs) == 1:
        stream(model, inputs[0], sampling)
        return 0
    ids = [model.tokenizer.encode(text) for text in inputs]
    outputs = model.generate(ids, [fitted(model, prompt, sampling) for prompt in ids])  # the engine batches them
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"{prompt}{output.outputs[0].text}", flush=True)
    return 0


def fitted(model, prompt: list[int], sampling: dict) -> SamplingParams:
    """The sampling settings, max_tokens cut to the room the context leaves (preflight said so)."""
    room = model.max_model_len - len(prompt)
    return SamplingParams(**{**sampling, "max_tokens": max(1, min(sampling["max_tokens"], room))})


def stream(model, text: str, sampling: dict) -> str:
    """Generate from one prompt, printing the text as the engine produces it; returns the text."""
    ids = model.tokenizer.encode(text)
    printed = ""
    for output in model.generate_stream(ids, fitted(model, ids, sampling)):
        new = output.outputs[0].text
        sys.stdout.write(new[len(printed):])
        sys.stdout.flush()
        printed = new
    sys.stdout.write("\n")
    sys.stdout.flush()
    return printed


def preflight(args: argparse.Namespace, prompts: list[str] | None) -> None:
    """Everything that can be checked before the weights load (minutes for DeepSeek-V3): the options,
    the tokenizer, the chat template with --chat, and each prompt's length against --max-seq-len.
    A prompt that leaves no room to generate is an error; one that leaves less than --max-new-tokens
    gets a note that its output will be cut."""
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, prefix="--")
    engine_args(args)
    if args.config is not None:
        raise UsageError("generate needs a checkpoint with a tokenizer; --config --random-weights has none "
                         "(give --ckpt DIR)")
    checkpoint = Path(args.ckpt) if args.ckpt else TINY_CHECKPOINT
    tokenizer = Tokenizer(checkpoint)
    if (args.chat or args.interactive) and not getattr(args, "chat_template", None) and not has_chat_template(
            checkpoint, tokenizer):
        raise UsageError(f"{checkpoint}: no chat template (no chat_template in tokenizer_config.json, no "
                         f"chat_template.jinja), so --chat/--interactive cannot format a conversation")
    if args.chat or args.interactive:
        from dsv3.server.chat_template import check_template_tokens

        for note in check_template_tokens(chat_template(args), tokenizer):
            if not args.quiet:
                print(f"dsv3: note: {note}", file=sys.stderr)
    config = load_config(checkpoint)
    max_seq_len = args.max_model_len or min(4096, config.max_position_embeddings)
    if max_seq_len > config.max_position_embeddings:
        raise UsageError(f"--max-model-len {max_seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    cut = []
    for number, prompt in enumerate(prompts or [], 1):
        length = len(tokenizer.encode(prompt))
        where = f"line {number} of {args.input_file}" if args.input_file else "the prompt"
        if length >= max_seq_len:
            raise UsageError(f"{where} is {length} tokens, which leaves no room to generate within --max-model-len "
                             f"{max_seq_len} (the model allows up to {config.max_position_embeddings})")
        if length + args.max_new_tokens > max_seq_len:
            cut.append((where, length))
    if cut and not args.quiet:
        where, length = max(cut, key=lambda c: c[1])
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        print(f"dsv3: note: --max-model-len {max_seq_len} cuts the output short: {where}{more} ({length} tokens) "
              f"leaves room for {max_seq_len - length} new tokens, not --max-new-tokens {args.max_new_tokens}",
              file=sys.stderr, flush=True)


def has_chat_template(checkpoint: Path, tokenizer: Tokenizer) -> bool:
    settings = tokenizer.settings
    template = settings.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise UsageError(f"{checkpoint / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                         f"named templates, found {type(template).__name__}")
    return bool(settings.get("chat_template")) or (checkpoint / "chat_template.jinja").is_file()


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, or of standard input for "-"."""
    if str(path) == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"standard input: not UTF-8 text ({e})") from None
        path = Path("<stdin>")
    elif not path.is_file():
        raise UsageError(f"{path}: no such file (--input-file takes a text file with one prompt per line, "
                         f"or - for standard input)")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise Dsv3Error(f"{path}: no prompts (one per line)")
    return prompts


def chat_template(args: argparse.Namespace):
    """The checkpoint's chat template (or --chat-template FILE), as `dsv3 serve` renders it."""
    from dsv3.server.chat_template import ChatTemplate, no_template_error

    checkpoint = args.ckpt or TINY_CHECKPOINT
    template = ChatTemplate.load(checkpoint, override=args.chat_template)
    if template is None:
        raise no_template_error(checkpoint)
    return template


def chat_loop(model, sampling: dict, template) -> int:
    print("dsv3 chat: type a message; /clear starts over, /exit quits.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")  # no prompt clutter when piped
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            messages = []
            print("(cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = stream(model, template.render(messages), sampling)
        except Dsv3Error as e:  # e.g. the conversation outgrew --max-model-len: say so and keep chatting
            print(f"dsv3: error: {e} (/clear starts over)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})
