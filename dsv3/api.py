"""The Python API: `load_model` and the `Model` it returns."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from dsv3 import checks, parallel
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import Backend
from dsv3.backends.select import select
from dsv3.config import ModelConfig, load_config
from dsv3.engine import Engine, SamplingParams
from dsv3.errors import BackendSetupError, CheckpointError, Dsv3Error
from dsv3.model import Transformer
from dsv3.precision import resolve_precision
from dsv3.tokenizer import Tokenizer
from dsv3.weights import CheckpointSource, RandomSource, WeightLoader

TINY_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny"


def info(message: str, quiet: bool = False) -> None:
    """One line of status on stderr (stdout carries only generated text and reports)."""
    if not quiet:
        print(f"dsv3: {message}", file=sys.stderr, flush=True)


class Model:
    """A loaded model: logits, generation and chat.

    Attributes:
        config: the model config.
        backend: the backend it runs on.
        precision: "fp8", "bf16" or "fp32".
        transformer: the model itself.
        tokenizer: the checkpoint's tokenizer, or None (synthetic weights).
    """

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer | None):
        self.transformer = transformer
        self.config = transformer.config
        self.backend = transformer.backend
        self.precision = transformer.precision
        self.tokenizer = tokenizer
        self.engine = Engine(transformer)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for tokens [B, T] (an integer tensor, or a list of equal-length lists
        of ints), every position, from position 0."""
        return self.transformer.logits(checks.token_batch(tokens, self.config.vocab_size))

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_token=None) -> list[str] | list[list[int]]:
        """Continue each prompt; text in gives text out, token ids in give token ids out."""
        as_text = bool(prompts) and isinstance(prompts[0], str)
        if as_text and self.tokenizer is None:
            raise Dsv3Error("this model has no tokenizer; pass token ids")
        ids = [self.tokenizer.encode(p) for p in prompts] if as_text else [list(p) for p in prompts]
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, self._stop_ids())
        out = self.engine.generate(ids, params, on_token)
        return [self.tokenizer.decode(o) for o in out] if as_text else out

    def _stop_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return tuple(sorted(ids))


def load_model(path_or_config: str | Path | ModelConfig | None = None, backend: str | Backend = "auto",
               precision: str = "auto", device: str | None = None, max_batch_size: int = 8,
               max_seq_len: int | None = None, load_mtp: bool = False, seed: int = 0, progress: bool = True,
               quiet: bool = False, tp: int | None = None, ep: int | None = None) -> Model:
    """Load a DeepSeek model.

    Args:
        path_or_config: a Hugging Face checkpoint directory; or a config (ModelConfig, a YAML/JSON
            path or a built-in config name) for synthetic weights; None for the built-in tiny checkpoint.
        backend: "auto" (picked from the hardware), a backend name, or a Backend instance.
        precision: "auto", "fp8", "bf16" or "fp32".
        device: torch device for the backend (its default when None).
        max_batch_size, max_seq_len: size of the preallocated latent cache (max_seq_len defaults to
            min(4096, the model's max_position_embeddings)).
        load_mtp: also load the MTP module.
        seed: seed of synthetic weights.
        progress: show a progress bar while loading.
        quiet: print no status lines.
        tp, ep: under torchrun, ranks sharing attention/dense layers and expert groups (dsv3.parallel);
            None means the world size (1 without torchrun). Each rank then holds only its part.
    Returns:
        A Model.
    """
    _check_load_arguments(path_or_config, backend, precision, device, max_batch_size, max_seq_len, seed, tp, ep)
    plan = parallel.plan_for(tp, ep)  # None in a single process
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
    tokenizer = None
    if checkpoint:
        if not (Path(path_or_config) / "config.json").is_file():
            raise CheckpointError(f"{path_or_config}: not a checkpoint directory (no config.json)")
        config = load_config(path_or_config)
        source = CheckpointSource(path_or_config)
        if (Path(path_or_config) / "tokenizer.json").exists():  # read before the weights: fail fast
            tokenizer = Tokenizer(path_or_config)
    else:
        config = path_or_config if isinstance(path_or_config, ModelConfig) else load_config(path_or_config)
    chosen_precision, why = resolve_precision(precision, chosen.capabilities, config.is_fp8 or not checkpoint, chip)
    info(why, quiet)
    if not checkpoint:
        source = RandomSource(config, fp8=chosen_precision == "fp8", seed=seed, device=chosen.device)
    max_seq_len = max_seq_len or min(4096, config.max_position_embeddings)
    if max_seq_len > config.max_position_embeddings:
        raise Dsv3Error(f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings="
                        f"{config.max_position_embeddings}")
    start = time.monotonic()
    try:
        if plan is not None:
            info(plan.describe(), quiet)
            transformer = parallel.build(plan, config, chosen, source, chosen_precision, max_batch_size,
                                         max_seq_len, load_mtp, progress and not quiet)
            loaded = sum(checks.model_bytes(plan.local_config(config), chosen_precision, 0, 0))
        else:
            loader = WeightLoader(source, config, include_mtp=load_mtp, progress=progress and not quiet,
                                  device=chosen.device)
            try:
                transformer = Transformer(config, chosen, loader, chosen_precision, max_batch_size, max_seq_len,
                                          load_mtp)
            finally:
                loader.close()
            loaded = loader.bytes_loaded
    except torch.OutOfMemoryError as e:
        raise checks.out_of_memory(e, config, chosen_precision, max_batch_size, max_seq_len, chosen.device) from None
    except BackendError as e:
        raise BackendSetupError(str(e)) from e
    size = f"{loaded / 1e9:.1f} GB" if loaded >= 1e8 else f"{loaded / 1e6:.1f} MB"
    info(f"loaded {size} in {time.monotonic() - start:.1f} s", quiet)
    return Model(transformer, tokenizer)


def _check_load_arguments(path_or_config, backend, precision, device, max_batch_size, max_seq_len, seed,
                          tp, ep) -> None:
    """load_model's arguments, checked before anything is built."""
    if not isinstance(path_or_config, (str, Path, ModelConfig, type(None))):
        raise TypeError(f"load_model takes a checkpoint directory, a config name or path, or a ModelConfig; "
                        f"got {type(path_or_config).__name__}")
    if not isinstance(backend, (str, Backend)):
        raise TypeError(f"backend must be a backend name or a Backend, got {type(backend).__name__}")
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string (auto, fp8, bf16, fp32), got {type(precision).__name__}")
    checks.check_int("max_batch_size", max_batch_size, 1)
    checks.check_int("max_seq_len", max_seq_len, 2, optional=True)
    checks.check_int("seed", seed)
    checks.check_int("tp", tp, 1, optional=True)
    checks.check_int("ep", ep, 1, optional=True)
    checks.check_device(device)
