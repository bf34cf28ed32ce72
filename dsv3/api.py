"""The Python API: `load_model` and the `Model` it returns."""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from dsv3 import checks, parallel
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import Backend
from dsv3.backends.select import select
from dsv3.checkpoint import CheckpointSource, RandomSource, WeightLoader
from dsv3.config import ModelConfig, load_config
from dsv3.errors import (
    BackendSetupError,
    ConfigError,
    Dsv3Error,
    EngineRequestError,
    OutOfMemoryError,
    RequestError,
    UsageError,
)
from dsv3.model import Transformer
from dsv3.precision import resolve_precision
from dsv3.serving import args as engine_args
from dsv3.serving.async_engine import AsyncEngine, EngineLoop
from dsv3.serving.cache_sizing import plan_cache
from dsv3.serving.engine import EngineConfig, LLMEngine
from dsv3.serving.outputs import RequestOutput
from dsv3.serving.params import SamplingParams, generation_defaults
from dsv3.serving.spec_decode import SpeculativeConfig
from dsv3.tokenizer import Tokenizer

TINY_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny"


def info(message: str, quiet: bool = False) -> None:
    """One line of status on stderr (stdout carries only generated text and reports)."""
    if not quiet:
        print(f"dsv3: {message}", file=sys.stderr, flush=True)


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
    """

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None, engine: LLMEngine):
        self.transformer = transformer
        self.config = transformer.config
        self.backend = transformer.backend
        self.precision = transformer.precision
        self.tokenizer = tokenizer
        self.engine = engine
        self.engine_loop = EngineLoop(engine)
        self.async_engine = AsyncEngine(self.engine_loop, tokenizer, transformer.config)
        # ranks of a parallel model must run identical steps: one caller at a time steps in its own thread
        self._lockstep = transformer.runs_in_lockstep()
        self._lock = threading.Lock()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for tokens [B, T] (an integer tensor, or a list of equal-length lists
        of ints), every position, from position 0."""
        return self.transformer.logits(checks.token_batch(tokens, self.config.vocab_size))

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
        if self._lockstep:
            return next(self._generate_in_lockstep(ids, params))
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
        if self._lockstep:
            yield from self._generate_in_lockstep([ids], [sampling_params], stream=True)
            return
        yield from self.engine_loop.stream(ids, sampling_params)

    def shutdown(self) -> None:
        """Stop the engine thread (unfinished requests fail)."""
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

    def _generate_in_lockstep(self, ids, params, stream: bool = False):
        """Every rank adds the same requests in the same order and steps until they finish (no thread)."""
        with self._lock:
            base = self.engine_loop.new_request_id()
            request_ids = [f"{base}.{i}" for i in range(len(ids))]
            for request_id, prompt, p in zip(request_ids, ids, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
            finals: dict[str, RequestOutput] = {}
            while len(finals) < len(ids):
                for output in self.engine.step():
                    if stream:
                        _raise_error(output)
                        yield output
                    if output.finished:
                        finals[output.request_id] = output
            if not stream:
                for output in finals.values():
                    _raise_error(output)
                yield [finals[r] for r in request_ids]


def _is_token_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _raise_error(output: RequestOutput) -> None:
    if output.error is not None:
        raise EngineRequestError(output.error)


def load_model(path_or_config: str | Path | ModelConfig | None = None, backend: str | Backend = "auto",
               precision: str = "auto", device: str | None = None, max_batch_size: int | None = None,
               max_seq_len: int | None = None, load_mtp: bool = False, seed: int = 0, progress: bool = True,
               quiet: bool = False, tp: int | None = None, ep: int | None = None, *,
               max_model_len: int | None = None, max_num_seqs: int | None = None,
               block_size: int = engine_args.DEFAULT_BLOCK_SIZE, gpu_memory_utilization: float = 0.9,
               cache_tokens: int | None = None, kv_cache_dtype: str = "auto",
               max_num_batched_tokens: int = engine_args.DEFAULT_MAX_NUM_BATCHED_TOKENS,
               enable_prefix_caching: bool = True, enforce_eager: bool = False, load_format: str = "auto",
               speculative_config: str | dict | SpeculativeConfig | None = None) -> Model:
    """Load a DeepSeek model.

    Args:
        path_or_config: a Hugging Face checkpoint directory; or a config (ModelConfig, a YAML/JSON
            path or a built-in config name) for synthetic weights; None for the built-in tiny checkpoint.
        backend: "auto" (picked from the hardware), a backend name, or a Backend instance.
        precision: "auto", "fp8", "bf16" or "fp32".
        device: torch device for the backend (its default when None).
        max_batch_size, max_seq_len: older names of max_num_seqs and max_model_len.
        load_mtp: also load the MTP module.
        seed: seed of synthetic weights.
        progress: show a progress bar while loading.
        quiet: print no status lines.
        tp, ep: under torchrun, ranks sharing attention/dense layers and expert groups (dsv3.parallel);
            None means the world size (1 without torchrun). Each rank then holds only its part.
        max_model_len: the longest sequence, prompt and output (default min(4096, max_position_embeddings)).
        max_num_seqs: sequences the engine runs at once (default 128).
        block_size: tokens per cache block.
        gpu_memory_utilization: fraction of an accelerator's memory for weights, activations and cache.
        cache_tokens: cache size in tokens instead of from memory (the CPU's default: cache_sizing).
        kv_cache_dtype: the latent cache's type (--kv-cache-dtype): "auto" (the activation dtype), "bf16", or
            "fp8": per token the latent in FP8 with a float32 scale per 128 values and the rope key in the
            activation dtype (656 bytes per layer in BF16 instead of 1152); a backend without it (ascend, a
            chip without FP8) keeps the dense cache and a warning says so.
        max_num_batched_tokens: tokens per engine step (longer prompts prefill in chunks).
        enable_prefix_caching: reuse the cache of equal prompt prefixes.
        enforce_eager: never replay recorded decode steps.
        load_format: "auto" reads the checkpoint's weights; "dummy" makes random ones for its config and
            keeps its tokenizer and generation defaults (vLLM's --load-format dummy: for benchmarks).
        speculative_config: MTP speculative decoding, as vLLM's --speculative-config: a JSON string, a dict
            or a SpeculativeConfig, e.g. {"method": "mtp", "num_speculative_tokens": 2} (loads the MTP module).
    Returns:
        A Model.
    """
    max_num_seqs = _alias("max_num_seqs", max_num_seqs, "max_batch_size", max_batch_size,
                          engine_args.DEFAULT_MAX_NUM_SEQS)
    max_model_len = _alias("max_model_len", max_model_len, "max_seq_len", max_seq_len, None)
    _check_load_arguments(path_or_config, backend, precision, device, max_num_seqs, max_model_len, seed, tp, ep,
                          load_format)
    engine_args.check_engine_arguments(argparse.Namespace(
        max_model_len=max_model_len, block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
        cache_tokens=cache_tokens, kv_cache_dtype=kv_cache_dtype, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens))
    speculative_config = SpeculativeConfig.parse(speculative_config, "speculative_config")
    plan = parallel.plan_for(tp, ep)  # None in a single process
    if speculative_config is not None and plan is not None:
        raise UsageError("speculative_config: MTP speculative decoding runs in one process only (no --tp/--ep yet)")
    quiet = quiet or (plan is not None and not plan.is_primary)
    if path_or_config is None:
        path_or_config = TINY_CHECKPOINT
        info(f"no checkpoint given: using the built-in tiny checkpoint ({TINY_CHECKPOINT})", quiet)
    if isinstance(backend, Backend):
        chosen, reason, chip = backend, f"{backend.capabilities.name} given", None
    else:
        try:
            chosen, decision = select(backend, device) if plan is None else parallel.select_rank_backend(
                backend, device, plan, select)
        except BackendError as e:  # backends raise their own errors; the API's are Dsv3Errors
            raise BackendSetupError(str(e)) from e
        reason, chip = decision.reason, decision.chip
    info(f"backend {chosen.capabilities.name} on {chosen.capabilities.device}: {reason}", quiet)

    checkpoint = isinstance(path_or_config, (str, Path)) and Path(path_or_config).is_dir()
    tokenizer = source = None
    if checkpoint:
        if not (Path(path_or_config) / "config.json").is_file():
            raise ConfigError(f"{path_or_config}: not a checkpoint directory (no config.json)")
        config = load_config(path_or_config)
        source = CheckpointSource(path_or_config) if load_format == "auto" else None
        if (Path(path_or_config) / "tokenizer.json").exists():  # read before the weights: fail fast
            tokenizer = Tokenizer(path_or_config)
    else:
        config = path_or_config if isinstance(path_or_config, ModelConfig) else load_config(path_or_config)
    sampling_defaults = generation_defaults(path_or_config if checkpoint else None)
    if speculative_config is not None:
        speculative_config.check_model(config, str(path_or_config) if checkpoint else "the model's config")
        load_mtp = True
    chosen_precision, why = resolve_precision(precision, chosen.capabilities, config.is_fp8 or not checkpoint, chip)
    info(why, quiet)
    if source is None:  # synthetic weights: a config, or a checkpoint's config with load_format="dummy"
        # a dummy load makes V3-sized experts already stacked on the device, as bench decode does
        fast = load_format == "dummy" and plan is None and chosen_precision == "fp8"
        source = RandomSource(config, fp8=chosen_precision == "fp8", seed=seed, device=chosen.device, fast=fast)
    max_model_len = max_model_len or min(4096, config.max_position_embeddings)
    if max_model_len > config.max_position_embeddings:
        raise Dsv3Error(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                        f"{config.max_position_embeddings}")
    start = time.monotonic()
    try:
        if plan is not None:
            info(plan.describe(), quiet)
            transformer = parallel.build(plan, config, chosen, source, chosen_precision, max_model_len, load_mtp,
                                         progress and not quiet)
            loaded = sum(checks.model_bytes(plan.local_config(config), chosen_precision, 0, 0))
        else:
            loader = WeightLoader(source, config, include_mtp=load_mtp, progress=progress and not quiet,
                                  device=chosen.device)
            try:
                transformer = Transformer(config, chosen, loader, chosen_precision, max_model_len, load_mtp)
            finally:
                loader.close()
            loaded = loader.bytes_loaded
    except torch.OutOfMemoryError as e:
        raise checks.out_of_memory(e, config, chosen_precision, 1, max_model_len, chosen.device) from None
    except BackendError as e:
        raise BackendSetupError(str(e)) from e
    size = f"{loaded / 1e9:.1f} GB" if loaded >= 1e8 else f"{loaded / 1e6:.1f} MB"
    info(f"loaded {size} in {time.monotonic() - start:.1f} s", quiet)
    transformer.kv_cache_dtype = kv_cache_dtype
    spec = transformer.cache_spec_for(1, block_size)
    if kv_cache_dtype == "fp8" and spec.kind != "fp8_ds_mla":
        # a warning, not a status line: printed under quiet too (not by the other ranks of a parallel model)
        info(f"warning: --kv-cache-dtype fp8: the {chosen.capabilities.name} backend has no FP8 latent cache; the "
             f"cache stays {str(spec.dtype).removeprefix('torch.')}", plan is not None and not plan.is_primary)
    cache = plan_cache(transformer, block_size, max_model_len, max_num_seqs, max_num_batched_tokens,
                       gpu_memory_utilization, cache_tokens, agree=None if plan is None else parallel.agree_min)
    info(cache.describe(), quiet)
    config_ = EngineConfig(max_model_len=max_model_len, block_size=block_size, num_blocks=cache.num_blocks,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                           kv_cache_dtype=kv_cache_dtype, speculative_config=speculative_config)
    eos = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_id is not None:
        eos.add(tokenizer.eos_id)
    try:
        engine = LLMEngine(transformer, config_, None if tokenizer is None else tokenizer.backend_tokenizer, eos,
                           sampling_defaults)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError(f"out of memory allocating the cache ({cache.describe()}); lower "
                               f"--gpu-memory-utilization or set --cache-tokens") from None
    return Model(transformer, tokenizer, engine)


def _alias(name: str, value, old_name: str, old_value, default):
    """A setting given under its name or its older one (not both)."""
    if value is not None and old_value is not None and value != old_value:
        raise UsageError(f"give {name} or its older name {old_name}, not both")
    if value is not None:
        return value
    return default if old_value is None else old_value


def _check_load_arguments(path_or_config, backend, precision, device, max_num_seqs, max_model_len, seed,
                          tp, ep, load_format) -> None:
    """load_model's arguments, checked before anything is built."""
    if not isinstance(path_or_config, (str, Path, ModelConfig, type(None))):
        raise TypeError(f"load_model takes a checkpoint directory, a config name or path, or a ModelConfig; "
                        f"got {type(path_or_config).__name__}")
    if not isinstance(backend, (str, Backend)):
        raise TypeError(f"backend must be a backend name or a Backend, got {type(backend).__name__}")
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string (auto, fp8, bf16, fp32), got {type(precision).__name__}")
    checks.check_int("max_num_seqs", max_num_seqs, 1)
    checks.check_int("max_model_len", max_model_len, 2, optional=True)
    checks.check_int("seed", seed)
    checks.check_int("tp", tp, 1, optional=True)
    checks.check_int("ep", ep, 1, optional=True)
    checks.check_device(device)
    if load_format not in ("auto", "dummy"):
        raise Dsv3Error(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
