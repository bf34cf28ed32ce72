"""Model: a loaded model with its serving engine (logits, batched and streamed generation, thread-safe).

EngineArgs.build (dsv3.engine_args) makes one; `dsv3.load_model` is the short way to it.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import torch

from dsv3 import checks, distributed
from dsv3.errors import EngineRequestError, RequestError, UsageError
from dsv3.model import Transformer
from dsv3.serving.async_engine import AsyncEngine, EngineLoop
from dsv3.serving.engine import LLMEngine
from dsv3.serving.outputs import RequestOutput
from dsv3.serving.params import SamplingParams
from dsv3.serving.workers import LocalRanks, LogitsCall, RankFailure, StepChannel, serve_steps
from dsv3.tokenizer import Tokenizer


class Model:
    """A loaded model with its serving engine: logits, generation (batched, streamed, thread-safe).

    Attributes:
        config: the model config.
        backend: the backend it runs on.
        precision: "fp8", "bf16" or "fp32".
        transformer: the model itself.
        tokenizer: the checkpoint's tokenizer, or None (synthetic weights).
        engine: the LLMEngine (cache, scheduler, sampler); one engine thread steps it for every caller.
        async_engine: the asyncio face of that thread (the HTTP server's).
        is_primary: whether this process drives the engine: true but on ranks other than 0 of a model over
            several ranks, which only run the steps rank 0 sends (`serve_steps`).
    """

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, engine: LLMEngine,
                 ranks: LocalRanks | None = None):
        self.transformer = transformer
        self.config = transformer.config
        self.backend = transformer.backend
        self.precision = transformer.precision
        self.tokenizer = tokenizer
        self.engine = engine
        self.engine_loop = EngineLoop(engine)
        self.async_engine = AsyncEngine(self.engine_loop, tokenizer, transformer.config)
        self.channel: StepChannel | None = engine.runner.channel
        self.is_primary = self.channel is None or distributed.is_primary()
        self.ranks = ranks
        if ranks is not None:
            ranks.on_failure = lambda message: self.engine_loop.fail(RankFailure(message))
        self.engine_loop.on_failure.append(self._stop_ranks)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for tokens [B, T] (an integer tensor, or a list of equal-length lists
        of ints), every position, from position 0."""
        tokens = checks.token_batch(tokens, self.config.vocab_size)
        if self.channel is None:
            return self.transformer.logits(tokens)
        with self.channel.lock:  # the other ranks run the same forward
            self.channel.send(LogitsCall(tokens))
            return self.transformer.logits(tokens)

    def serve_steps(self) -> None:
        """On a rank other than 0 (torchrun, or a worker dsv3 started): run the steps rank 0 sends until
        it shuts down."""
        if self.is_primary:
            raise UsageError("serve_steps runs on ranks other than 0; rank 0 drives the engine")
        serve_steps(self)
        if self.ranks is not None:  # another node's first rank: its node's workers were told to stop too
            self.ranks.stop()

    def _stop_ranks(self, reason: str) -> None:
        """A rank failed (the engine loop has failed every request): end the workers this process started;
        those torchrun started end when their collectives with this process break."""
        if self.channel is not None:
            self.channel.broken = True
        if self.ranks is not None:
            self.ranks.kill()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate from each prompt; the engine batches them (with other threads' requests).

        Args:
            prompts: a str (one prompt), a list of str, a list of token ids (one prompt) or a list of
                token-id lists; any number.
            sampling_params: one SamplingParams for all, one per prompt, or None (the checkpoint's defaults).
        Returns:
            One RequestOutput per prompt, in order (text, token ids, finish reason, logprobs).
        Raises:
            RequestError (nothing run) for a bad prompt or setting; EngineRequestError if the engine failed a
            request (the others finish first).
        """
        ids = self._prompt_ids(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(ids)
        if len(params) != len(ids):
            raise RequestError(f"{len(params)} sampling params for {len(ids)} prompts", param="sampling_params")
        for prompt, p in zip(ids, params, strict=True):
            self.engine.check_request(prompt, p)  # every request checked before any runs
        inbox: queue.Queue = queue.Queue()
        request_ids = [self.engine_loop.new_request_id() for _ in ids]
        submitted = []
        try:
            for request_id, prompt, p in zip(request_ids, ids, params, strict=True):
                self.engine_loop.submit(request_id, prompt, p, inbox.put)
                submitted.append(request_id)
            finals: dict[str, object] = {}
            while len(finals) < len(ids):
                item = inbox.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finals[item.request_id] = item
        except BaseException:
            for request_id in submitted:
                self.engine_loop.abort(request_id)
            raise
        outputs = [finals[r] for r in request_ids]
        failed = [(i, o.error) for i, o in enumerate(outputs) if o.error is not None]
        if failed:
            raise EngineRequestError(f"prompt {failed[0][0]}: {failed[0][1]}")
        return outputs

    def greedy_tokens(self, prompts, max_tokens: int) -> list[list[int]]:
        """The greedy continuation of each prompt as token ids (an end-of-sentence token ends one and is kept),
        at most `max_tokens` and never past the context: what backends and conversions are compared by."""
        ids = self._prompt_ids(prompts)
        params = [SamplingParams(max_tokens=max(1, min(max_tokens, self.max_model_len - len(p))), temperature=0.0)
                  for p in ids]
        return [o.outputs[0].token_ids for o in self.generate(ids, params)]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """The outputs of one prompt as the engine produces them (cumulative text and tokens), the last finished."""
        if not (isinstance(prompt, str) or _is_token_list(prompt)):
            raise RequestError("generate_stream takes one prompt: a str or a list of token ids", param="prompt")
        (ids,) = self._prompt_ids(prompt)
        yield from self.engine_loop.stream(ids, sampling_params)

    def shutdown(self) -> None:
        """Stop the engine thread (unfinished requests fail) and, over several ranks, every rank."""
        self.engine_loop.shutdown()

    def _prompt_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError("prompts must be a str, a list of str, or token id lists (at least one)",
                               param="prompt")
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise RequestError("this model has no tokenizer; pass token ids", param="prompt")
                ids.append(self.tokenizer.encode(p))
            elif isinstance(p, (list, tuple)):
                ids.append(list(p))
            else:
                raise RequestError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}",
                                   param="prompt")
        return ids


def _is_token_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)
