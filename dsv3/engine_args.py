"""EngineArgs: every setting of loading a model and of its engine, each with its default, check and help, once.

`EngineArgs(...).build()` checks every setting before anything loads, then selects the backend, reads the
config and tokenizer, loads the weights, sizes the cache and starts the engine: a Model (dsv3.llm).
`dsv3.load_model(model, **settings)` takes the same names as keywords; the `dsv3` commands map their flags
onto them in dsv3/commands/args.py, the one file that names flags.

Adding a setting is one change, here: a field made with `setting(default, help, ...)` (its check, its choices,
older names), read in `build`. Every field with `cli=True` (the default) becomes the flag `--field-name` of
`dsv3 generate`, `dsv3 serve` and `dsv3 bench serve` with that type, default, choices and help. A message
about a setting names it through `self.name(field)`: the keyword here, the flag under the CLI.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3 import checks, distributed, parallel
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import Backend
from dsv3.backends.latent_cache import KV_CACHE_DTYPES
from dsv3.backends.select import select
from dsv3.checkpoint import CheckpointSource, RandomSource, WeightLoader
from dsv3.checkpoint.read import check_config_fits
from dsv3.config import ModelConfig, load_config
from dsv3.errors import BackendSetupError, ConfigError, OutOfMemoryError, UsageError
from dsv3.llm import Model
from dsv3.model import Transformer
from dsv3.precision import CHOICES as PRECISIONS
from dsv3.precision import resolve_precision
from dsv3.serving.cache_sizing import plan_cache
from dsv3.serving.data_parallel import DataParallelEngine
from dsv3.serving.engine import EngineConfig, LLMEngine
from dsv3.serving.params import generation_defaults
from dsv3.serving.spec_decode import SpeculativeConfig
from dsv3.serving.workers import LocalRanks, StepChannel
from dsv3.tokenizer import Tokenizer

#: what `model=None` loads: a two-layer checkpoint with a tokenizer, shipped in the package
TINY_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny"

LOAD_FORMATS = ("auto", "dummy")

Check = Callable[[str, object], None]  # (the setting's name as the caller knows it, its value); raises


def setting(default, help: str, check: Check | None = None, *, choices: tuple | None = None,
            aliases: tuple[str, ...] = (), group: str = "engine", cli: bool = True, metavar: str | None = None,
            short: str | None = None):
    """A field of EngineArgs.

    Args:
        default: the value when not given (None: decided at build, as `help` says).
        help: one sentence for the flag's --help and the reader.
        check: called as check(name, value) before anything loads; raises UsageError or TypeError.
        choices: the allowed values (checked; listed in --help).
        aliases: older keyword names (a flag each too) that still work.
        group: "model" or "engine": where --help lists the flag.
        cli: whether the commands have a flag for it.
        metavar: the flag's value placeholder in --help.
        short: a short flag too (vLLM's -tp).
    """
    return field(default=default, metadata=dict(help=help, check=check, choices=choices, aliases=aliases,
                                                group=group, cli=cli, metavar=metavar, short=short))


def _int(minimum: int | None = None, optional: bool = False) -> Check:
    return lambda name, value: checks.check_int(name, value, minimum, optional)


def _fraction(name: str, value) -> None:
    checks.check_number(name, value, 0.0, 1.0, low_open=True)


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _text(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{name} must be a non-empty string, got {value!r}")


def _model(name: str, value) -> None:
    if not isinstance(value, (str, Path, ModelConfig, type(None))):
        raise TypeError(f"load_model takes a checkpoint directory, a config name or path, or a ModelConfig; "
                        f"got {type(value).__name__}")


def _backend(name: str, value) -> None:
    if not isinstance(value, (str, Backend)):
        raise TypeError(f"{name} must be a backend name or a Backend, got {type(value).__name__}")


def _precision(name: str, value) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string ({', '.join(PRECISIONS)}), got {type(value).__name__}")


def _device(name: str, value) -> None:
    checks.check_device(value, name)


def _generation_config(name: str, value) -> None:
    if not isinstance(value, (str, Path)) or (value not in ("auto", "vllm") and not Path(value).is_dir()):
        raise UsageError(f"{name} must be auto, vllm or a directory with a generation_config.json, got {value!r}")


def _speculative(name: str, value) -> None:
    SpeculativeConfig.parse(value, name)


def info(message: str, quiet: bool = False) -> None:
    """One line of status on stderr (stdout carries only generated text and reports)."""
    if not quiet:
        print(f"dsv3: {message}", file=sys.stderr, flush=True)


@dataclass
class EngineArgs:
    """Every setting of a load and of its engine.

    Attributes:
        # the model
        model: a Hugging Face checkpoint directory; or a config (ModelConfig, a YAML/JSON path or a built-in
            config name) for synthetic weights; None for the built-in tiny checkpoint (TINY_CHECKPOINT).
        backend, precision, device, load_format, load_mtp, seed: see each field's help.
        # several ranks (dsv3.serving.workers)
        tensor_parallel_size, data_parallel_size, enable_expert_parallel, ep, nnodes, node_rank, master_addr,
        master_port: see each field's help.
        # the engine
        max_model_len, max_num_seqs, max_num_batched_tokens, block_size, kv_cache_dtype,
        gpu_memory_utilization, cache_tokens, enable_prefix_caching, enforce_eager: see each field's help.
        # output
        quiet, progress: status lines and the progress bar on stderr.
    """

    # ---- the model -------------------------------------------------------------------------------
    model: str | Path | ModelConfig | None = setting(
        None, "a checkpoint directory, a config for synthetic weights, or None for the built-in tiny checkpoint",
        _model, aliases=("path_or_config",), group="model", cli=False)
    backend: str | Backend = setting(
        "auto", "auto (picked from the hardware; DSV3_BACKEND overrides), reference, cuda, rocm or ascend, or a "
        "Backend", _backend, group="model")
    precision: str = setting("auto", "auto: FP8 where the chip and checkpoint have it, else BF16", _precision,
                             choices=PRECISIONS, group="model")
    device: str | None = setting(None, "torch device for the backend (default: the backend's)", _device,
                                 group="model")
    load_format: str = setting(
        "auto", "auto: the checkpoint's safetensors; dummy: random weights of the checkpoint's config, with its "
        "tokenizer and generation defaults (for benchmarks: a directory with config.json and tokenizer files "
        "is enough)", choices=LOAD_FORMATS)
    load_mtp: bool = setting(False, "also load the MTP module", _bool, group="model", cli=False)
    seed: int = setting(0, "random seed (vLLM's --seed): of the sampling of requests that bring no seed, and of "
                        "synthetic weights", _int(), group="model", cli=False)
    generation_config: str = setting(
        "auto", "sampling defaults (vLLM's --generation-config): auto, the checkpoint's generation_config.json; "
        "vllm, none (temperature 1, no truncation); or a directory holding a generation_config.json",
        _generation_config, group="model", metavar="{auto,vllm,DIR}")
    tensor_parallel_size: int | None = setting(
        None, "ranks sharing attention, dense MLPs, embedding and head; without torchrun this process becomes rank "
        "0 and starts the others itself (default 1; under torchrun every rank, or the world / "
        "data_parallel_size); see docs/parallel.md", _int(1, optional=True), aliases=("tp",), group="model",
        short="-tp", metavar="N")
    data_parallel_size: int = setting(
        1, "data-parallel attention: groups of tensor_parallel_size ranks, each running attention for its own "
        "requests over its own latent cache, the MoE layers expert-parallel over every rank", _int(1),
        group="model", short="-dp", metavar="N")
    enable_expert_parallel: bool = setting(
        False, "spread the routed experts over every rank (what dsv3 does unless ep says fewer groups)", _bool,
        group="model")
    nnodes: int = setting(
        1, "nodes the ranks are spread over without torchrun: the same command runs on each node with its "
        "node_rank and starts that node's share of the ranks; node 0 serves", _int(1), group="model", metavar="N")
    node_rank: int = setting(0, "this node's index among nnodes (0: the node that serves)", _int(0), group="model",
                             metavar="N")
    master_addr: str = setting("127.0.0.1", "node 0's address, where the ranks meet (torch.distributed's "
                               "rendezvous)", _text, group="model", metavar="ADDRESS")
    master_port: int | None = setting(None, "the rendezvous port on node 0 (default: a free one; needed with "
                                      "nnodes > 1)", _int(1, optional=True), group="model", metavar="PORT")
    ep: int | None = setting(None, "expert groups the routed experts are split into (default: one per rank); "
                             "see docs/parallel.md", _int(1, optional=True), group="model", metavar="N")

    # ---- the engine ------------------------------------------------------------------------------
    max_model_len: int | None = setting(
        None, "the longest sequence, prompt and output (default: min(4096, the model's max_position_embeddings))",
        _int(2, optional=True), aliases=("max_seq_len",))
    max_num_seqs: int = setting(128, "sequences running at once", _int(1), aliases=("max_batch_size",))
    max_num_batched_tokens: int = setting(2048, "tokens per engine step; longer prompts are prefilled in chunks",
                                          _int(1))
    block_size: int | None = setting(
        None, "tokens per cache block (default: the backend's, a size its fused attention takes: 128 on ascend, "
        "64 elsewhere)", _int(1, optional=True))
    kv_cache_dtype: str = setting(
        "auto", "the latent cache's type: auto (the activation dtype), bf16, or fp8: the latent in FP8 with a "
        "float32 scale per 128 values and the rope key in BF16, 656 instead of 1152 bytes per token per layer, "
        "so the same memory holds about 1.75x the tokens (cuda, rocm, reference; ascend keeps BF16 and says so); "
        "the commands take vLLM's names too (fp8_e4m3, bfloat16)",
        choices=KV_CACHE_DTYPES, metavar="{" + ",".join(KV_CACHE_DTYPES) + "}")
    gpu_memory_utilization: float = setting(
        0.9, "fraction of the accelerator's memory for weights, activations and cache", _fraction)
    cache_tokens: int | None = setting(
        None, "cache size in tokens instead of from memory (default on the CPU: 65536, less where memory is "
        "short)", _int(1, optional=True))
    enable_prefix_caching: bool = setting(True, "reuse the cache of equal prompt prefixes", _bool)
    enforce_eager: bool = setting(False, "never replay recorded decode steps (CUDA graphs)", _bool)
    speculative_config: str | dict | SpeculativeConfig | None = setting(
        None, 'speculative decoding with the checkpoint\'s MTP module, as vLLM takes it: a JSON string, a dict or a '
        'SpeculativeConfig such as {"method": "mtp", "num_speculative_tokens": 1} ("deepseek_mtp" too; k > 1 '
        'applies the one module recurrently; "disable_by_batch_size": N drafts only while at most N sequences '
        'run); loads the MTP module', _speculative, metavar="JSON")

    # ---- output ----------------------------------------------------------------------------------
    quiet: bool = setting(False, "print no status lines on stderr", _bool, group="model")
    progress: bool = setting(True, "show a progress bar while loading", _bool, cli=False)

    @classmethod
    def from_keywords(cls, **settings) -> EngineArgs:
        """EngineArgs from load_model's keywords: older names mapped to the current ones (not both)."""
        names = {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            for old in f.metadata["aliases"]:
                if old in settings:
                    value = settings.pop(old)
                    if settings.get(f.name) is not None and value is not None and settings[f.name] != value:
                        raise UsageError(f"give {f.name} or its older name {old}, not both")
                    if settings.get(f.name) is None and value is not None:
                        settings[f.name] = value
        for key in settings:
            if key not in names:
                close = difflib.get_close_matches(key, names, 1)
                raise TypeError(f"load_model got an unknown setting {key!r}"
                                + (f" (did you mean {close[0]!r}?)" if close else ""))
        return cls(**settings)

    def name(self, field_name: str) -> str:
        """How messages name a setting: its keyword (the CLI's subclass names its flag)."""
        return field_name

    def check(self) -> None:
        """Every setting, before anything loads: one UsageError (TypeError for a wrong kind of object) naming it."""
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), self.name(f.name)
            if f.metadata["check"] is not None:
                f.metadata["check"](name, value)
            choices = f.metadata["choices"]
            if choices is not None and value not in choices:
                raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.nnodes > 1:
            if self.master_port is None:
                raise UsageError(f"{self.name('nnodes')} {self.nnodes}: give {self.name('master_port')} (and "
                                 f"{self.name('master_addr')}, node 0's address) so the nodes can meet")
            if self.world_size % self.nnodes:
                raise UsageError(f"{self.name('nnodes')} {self.nnodes} does not divide the {self.world_size} ranks "
                                 f"({self.name('data_parallel_size')} x {self.name('tensor_parallel_size')})")
        if self.node_rank >= self.nnodes:
            raise UsageError(f"{self.name('node_rank')} {self.node_rank} is not below {self.name('nnodes')} "
                             f"{self.nnodes}")
        if self.enable_expert_parallel and self.ep not in (None, self.world_size):
            raise UsageError(f"{self.name('enable_expert_parallel')} spreads the experts over all "
                             f"{self.world_size} ranks; {self.name('ep')} {self.ep} says otherwise: give one")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise UsageError(f"{self.name('max_num_batched_tokens')} {self.max_num_batched_tokens} is below "
                             f"{self.name('max_num_seqs')} {self.max_num_seqs}: a step could not decode every "
                             f"running sequence")

    @property
    def world_size(self) -> int:
        """The ranks the sizes ask for (torchrun's world may be larger: then tensor_parallel_size defaults)."""
        return (self.tensor_parallel_size or 1) * self.data_parallel_size

    # ---- building --------------------------------------------------------------------------------

    def build(self) -> Model:
        """Check every setting, then load the model and start its engine. Over several ranks without a launcher,
        this process becomes rank 0 and starts the others first (each builds with these same settings)."""
        self.check()
        speculative = SpeculativeConfig.parse(self.speculative_config, self.name("speculative_config"))
        if speculative is not None and (self.world_size > 1 or distributed.launch().world_size > 1):
            raise UsageError(f"{self.name('speculative_config')}: MTP speculative decoding runs in one process only "
                             f"(no {self.name('tensor_parallel_size')}/{self.name('ep')} yet)")
        ranks = None
        if self.world_size > 1 and distributed.launch().world_size == 1:
            if isinstance(self.backend, Backend):
                raise UsageError(f"{self.name('tensor_parallel_size')}: every rank builds its own backend; give the "
                                 f"backend's name, not a Backend")
            self._check_layout()
            per_node = self.world_size // self.nnodes  # this process becomes its node's first rank (0 on node 0)
            ranks = LocalRanks(self.world_size, self, self.node_rank * per_node, per_node, self.master_addr,
                               self.master_port)
        try:
            model = self._build(speculative, ranks)
        except BaseException:
            if ranks is not None:
                ranks.kill()
            raise
        if ranks is not None:
            info(ranks.describe(), self.quiet)
        if model.channel is not None and model.is_primary:
            atexit.register(model.shutdown)  # before the process group goes: the other ranks are told to stop
        return model

    def _check_layout(self) -> None:
        """A layout the model cannot be cut into, refused before any rank starts (the ranks check it again, FP8
        blocks included once the precision is known, before any weight is read)."""
        model = TINY_CHECKPOINT if self.model is None else self.model
        config = model if isinstance(model, ModelConfig) else load_config(model)
        world, dp = self.world_size, self.data_parallel_size
        plan = parallel.ParallelPlan(0, world, 0, self.tensor_parallel_size or 1, self.ep or world, dp)
        plan.check(config, self.precision, self.load_mtp)

    def _build(self, speculative: SpeculativeConfig | None, ranks: LocalRanks | None) -> Model:
        plan = parallel.plan_for(self.tensor_parallel_size, self.ep, self.data_parallel_size)  # None: one process
        quiet = self.quiet or (plan is not None and not plan.is_primary)
        model = self.model
        if model is None:
            model = TINY_CHECKPOINT
            info(f"no checkpoint given: using the built-in tiny checkpoint ({TINY_CHECKPOINT})", quiet)
        backend, chip = self._backend(plan, quiet)
        config, source, tokenizer, sampling_defaults, checkpoint = self._source(model)
        if speculative is not None:
            speculative.check_model(config, str(model) if checkpoint else "the model's config")
        precision, why = resolve_precision(self.precision, backend.capabilities, config.is_fp8 or not checkpoint,
                                           chip, self.name("precision"))
        info(why, quiet)
        if source is None:  # synthetic weights: a config, or a checkpoint's config with load_format="dummy"
            # a dummy load makes V3-sized experts already stacked on the device, as bench decode does
            fast = self.load_format == "dummy" and plan is None and precision == "fp8"
            checks.check_synthetic_fits(config, precision, backend.device, plan,
                                        self.load_mtp or self.speculative_config is not None)
            source = RandomSource(config, fp8=precision == "fp8", seed=self.seed, device=backend.device, fast=fast)
        max_model_len = self.max_model_len or min(4096, config.max_position_embeddings)
        if max_model_len > config.max_position_embeddings:
            raise UsageError(f"{self.name('max_model_len')} {max_model_len} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        transformer = self._transformer(plan, config, backend, source, precision, max_model_len,
                                        self.load_mtp or speculative is not None, quiet)
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        engine = self._engine(transformer, plan, max_model_len, speculative, tokenizer, eos, sampling_defaults,
                              quiet, ranks)
        return Model(transformer, tokenizer, engine, ranks)

    def _backend(self, plan, quiet: bool) -> tuple[Backend, object]:
        """The backend (given, or selected for this process or rank) and the chip it found (None if given)."""
        if isinstance(self.backend, Backend):
            backend, reason, chip = self.backend, f"{self.backend.capabilities.name} given", None
        else:
            try:
                backend, decision = select(self.backend, self.device) if plan is None else \
                    parallel.select_rank_backend(self.backend, self.device, plan, select)
            except BackendError as e:  # backends raise their own errors; the API's are Dsv3Errors
                raise BackendSetupError(str(e)) from e
            reason, chip = decision.reason, decision.chip
        info(f"backend {backend.capabilities.name} on {backend.capabilities.device}: {reason}", quiet)
        return backend, chip

    def _source(self, model) -> tuple[ModelConfig, CheckpointSource | None, Tokenizer | None, dict, bool]:
        """(config, the checkpoint's weights or None for synthetic ones, tokenizer, sampling defaults, whether
        `model` is a checkpoint directory); the tokenizer and generation config are read before the weights,
        to fail fast."""
        if not (isinstance(model, (str, Path)) and Path(model).is_dir()):
            config = model if isinstance(model, ModelConfig) else load_config(model)
            return config, None, None, {}, False
        if not (Path(model) / "config.json").is_file():
            raise ConfigError(f"{model}: not a checkpoint directory (no config.json)")
        source = CheckpointSource(model) if self.load_format == "auto" else None
        config = load_config(model)
        if source is not None:  # before any per-layer work: sizes the shards cannot hold are refused
            check_config_fits(config, source)
        tokenizer = Tokenizer(model) if (Path(model) / "tokenizer.json").exists() else None
        defaults = {} if self.generation_config == "vllm" else \
            generation_defaults(model if self.generation_config == "auto" else self.generation_config)
        return config, source, tokenizer, defaults, True

    def _transformer(self, plan, config: ModelConfig, backend: Backend, source, precision: str,
                     max_model_len: int, load_mtp: bool, quiet: bool) -> Transformer:
        """The model with its weights (this rank's part under tensor/expert parallelism)."""
        start, progress = time.monotonic(), self.progress and not quiet
        try:
            if plan is not None:
                info(plan.describe(), quiet)
                transformer = parallel.build(plan, config, backend, source, precision, max_model_len,
                                             load_mtp, progress)
                loaded = sum(checks.model_bytes(plan.local_config(config), precision, 0, 0))
            else:
                loader = WeightLoader(source, config, include_mtp=load_mtp, progress=progress,
                                      device=backend.device)
                try:
                    transformer = Transformer(config, backend, loader, precision, max_model_len, load_mtp)
                finally:
                    loader.close()
                loaded = loader.bytes_loaded
        except torch.OutOfMemoryError as e:
            raise checks.out_of_memory(e, config, precision, 1, max_model_len, backend.device) from None
        except BackendError as e:
            raise BackendSetupError(str(e)) from e
        size = f"{loaded / 1e9:.1f} GB" if loaded >= 1e8 else f"{loaded / 1e6:.1f} MB"
        info(f"loaded {size} in {time.monotonic() - start:.1f} s", quiet)
        return transformer

    def _engine(self, transformer: Transformer, plan, max_model_len: int, speculative: SpeculativeConfig | None,
                tokenizer: Tokenizer | None, eos: set, sampling_defaults: dict, quiet: bool,
                ranks: LocalRanks | None) -> LLMEngine:
        """The cache sized to what the device has left, and the engine over it."""
        backend = transformer.backend
        block_size = self.block_size or backend.mla_block_size
        spec = transformer.cache_spec_for(1, block_size, self.kv_cache_dtype)
        if self.kv_cache_dtype == "fp8" and spec.kind != "fp8_ds_mla":
            # a warning, not a status line: printed under quiet too (not by the other ranks of a parallel model)
            info(f"warning: {self.name('kv_cache_dtype')} fp8: the {backend.capabilities.name} backend has no FP8 "
                 f"latent cache; the cache stays {str(spec.dtype).removeprefix('torch.')}",
                 plan is not None and not plan.is_primary)
        cache = plan_cache(transformer, block_size, max_model_len, self.max_num_seqs, self.max_num_batched_tokens,
                           self.gpu_memory_utilization, self.cache_tokens,
                           agree=None if plan is None else parallel.agree_min, name=self.name,
                           kv_cache_dtype=self.kv_cache_dtype)
        if plan is None:
            info(cache.describe(), quiet)
        else:  # each DP group holds its own requests' cache; the TP ranks of a group hold the same blocks
            info(f"{cache.describe()} per rank; {plan.dp * cache.num_tokens} tokens in total over {plan.dp} "
                 f"DP group{'s' if plan.dp > 1 else ''} of {plan.tp} rank{'s' if plan.tp > 1 else ''}", quiet)
        config = EngineConfig(max_model_len=max_model_len, block_size=block_size, num_blocks=cache.num_blocks,
                              max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                              enable_prefix_caching=self.enable_prefix_caching,
                              enforce_eager=self.enforce_eager or (plan is not None and plan.dp > 1),
                              kv_cache_dtype=self.kv_cache_dtype, speculative_config=speculative, seed=self.seed)
        channel = None if plan is None else StepChannel(ranks)  # every rank, before the engine records any step
        text = None if tokenizer is None else tokenizer.backend_tokenizer
        try:
            engine = LLMEngine(transformer, config, text, eos, sampling_defaults, channel)
            if plan is None or plan.dp == 1 or not plan.is_primary:
                return engine
            # DP attention: rank 0 schedules every group (data_parallel); the others' caches are on their ranks.
            # Its steps run eagerly (above): each group would replay its own bucket, not one size for all
            others = [LLMEngine(transformer, config, text, eos, sampling_defaults, channel, local=False)
                      for _ in range(plan.dp - 1)]
            return DataParallelEngine([engine, *others], plan.tp)
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(f"out of memory allocating the cache ({cache.describe()}); lower "
                                   f"{self.name('gpu_memory_utilization')} or set {self.name('cache_tokens')}"
                                   ) from None
