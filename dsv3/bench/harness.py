"""The bench model on a device and how its steps are timed: how many layers fit in free memory
(bench_config, fit_layers), building it with synthetic weights (build_model), filling its caches,
the static decode step the serving engine is measured against (StaticDecode), counting the experts
it runs (ExpertCounter) and profiling a step (timing: common.time_op).
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from dsv3.backends.interface import Backend, PagedBatch
from dsv3.bench.steps import _absorbed_mla_bytes, _activation_bytes, layer_read_bytes
from dsv3.checkpoint import RandomSource, WeightLoader
from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.model import ForwardBatch, Transformer

HEADROOM = 0.15            # of free device memory left unused
WORKSPACE_BYTES = 1 << 30  # activations, graph pools, kernel workspaces
BLOCK_SIZE = 64            # the engine's default cache block


# ---- the model: how many layers fit, building it ----------------------------------------------

def bench_config(base: ModelConfig, layers: int) -> ModelConfig:
    """`base` with `layers` layers: up to first_k_dense_replace dense ones, then MoE (at least one)."""
    if layers < 1:
        raise Dsv3Error(f"bench: --layers must be at least 1, got {layers}")
    dense = min(base.first_k_dense_replace, layers - 1) if base.n_routed_experts else layers
    return base.replace(num_hidden_layers=layers, first_k_dense_replace=dense)


def model_weight_bytes(c: ModelConfig, precision: str) -> float:
    """The weights a backend keeps: every layer's (all experts; MLA's dense kv_b beside w_uk and w_uv),
    the embedding and the head."""
    tables = c.vocab_size * c.hidden_size * _activation_bytes(precision) * (1 if c.tie_word_embeddings else 2)
    layers = sum(layer_read_bytes(c, i, precision, c.n_routed_experts if c.is_moe_layer(i) else 0)
                 + _absorbed_mla_bytes(c, precision) for i in range(c.num_hidden_layers))
    return tables + layers


def model_memory_bytes(c: ModelConfig, precision: str, max_batch: int, max_seq: int) -> float:
    """The weights, every layer's latent cache, the logits buffers and a workspace."""
    cache = c.num_hidden_layers * max_batch * max_seq * (c.kv_lora_rank + c.qk_rope_head_dim) * \
        _activation_bytes(precision)
    return model_weight_bytes(c, precision) + cache + WORKSPACE_BYTES + 3 * 4 * max_batch * c.vocab_size


def fit_layers(base: ModelConfig, precision: str, free_bytes: float, max_batch: int, max_seq: int,
               headroom: float = HEADROOM) -> int:
    """The most layers (bench_config) whose model takes at most (1 - headroom) of `free_bytes`."""
    budget = free_bytes * (1.0 - headroom)
    fitting = 0
    for layers in range(1, base.num_hidden_layers + 1):
        if model_memory_bytes(bench_config(base, layers), precision, max_batch, max_seq) > budget:
            break
        fitting = layers
    if fitting == 0:
        need = model_memory_bytes(bench_config(base, 1), precision, max_batch, max_seq)
        raise Dsv3Error(f"bench: one layer needs {need / 1e9:.1f} GB with the cache for batch {max_batch} x "
                        f"{max_seq} tokens; {free_bytes / 1e9:.1f} GB are free (keeping {headroom:.0%})")
    return fitting


def free_memory(device: torch.device) -> int | None:
    """Free bytes on `device` after releasing cached blocks; None where torch cannot tell (the CPU)."""
    gc.collect()
    module = torch.get_device_module(device)
    if hasattr(module, "empty_cache"):
        module.empty_cache()
    info = getattr(module, "mem_get_info", None)
    return int(info(device)[0]) if info is not None else None


def build_model(config: ModelConfig, backend: Backend, precision: str, max_batch: int, max_seq: int,
                seed: int = 0) -> Transformer:
    """The model with synthetic weights made on the backend's device (experts stacked there directly)."""
    started = time.perf_counter()
    source = RandomSource(config, fp8=precision == "fp8", seed=seed, device=backend.device, fast=True)
    loader = WeightLoader(source, config, progress=False)
    try:
        model = Transformer(config, backend, loader, precision, max_seq)
        model.allocate_cache(1 + max_batch * _blocks(max_seq), BLOCK_SIZE)  # block 0: the engine's scratch
    except torch.OutOfMemoryError as e:
        raise Dsv3Error(f"bench: {config.num_hidden_layers} layers with a cache for batch {max_batch} x {max_seq} "
                        f"tokens do not fit on {backend.device} (pass fewer --layers): {str(e).splitlines()[0]}") from e
    finally:
        loader.close()
    print(f"dsv3 bench: built {config.num_hidden_layers} layers on the {backend.capabilities.name} backend in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return model


def fill_caches(model: Transformer, seed: int = 0) -> None:
    """Random values in every cache position (the tokens a long prefill would have left)."""
    g = torch.Generator(model.backend.device).manual_seed(seed)
    for cache in model.caches:
        cache.normal_(generator=g)


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def _paged(num_seqs: int, seq_len: int, query_len: int, device: torch.device) -> PagedBatch:
    """Sequence b in its own run of blocks after the scratch block, as a fresh engine would place it."""
    per_seq = _blocks(seq_len)
    return PagedBatch(
        block_tables=1 + torch.arange(num_seqs * per_seq, dtype=torch.int32, device=device).view(num_seqs, -1),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        query_start=torch.arange(0, num_seqs * query_len + 1, query_len, dtype=torch.int32, device=device),
        max_query_len=query_len, max_seq_len=seq_len)


def prefill_last_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill tokens [1, T] into the first sequence's blocks from position 0; float32 logits [1, V] of
    the last token only (what generation needs)."""
    t = tokens.shape[1]
    positions = torch.arange(t, device=tokens.device)
    batch = ForwardBatch(tokens[0], positions, 0, None, _paged(1, t, t, tokens.device), logits_indices=positions[-1:])
    return model.forward(batch)


class StaticDecode:
    """One decode step of a fixed batch: every sequence at `context` tokens, each in its own blocks.

    This is the ceiling the serving engine is held to: the same forward with no scheduling, no host
    work between steps and, where the backend records steps, one graph replay.

    Args:
        model: a model from build_model (its cache holds batch x (context + 1) tokens).
        tokens: int64 [B] the new tokens.
        context: tokens already cached per sequence.
    """

    def __init__(self, model: Transformer, tokens: torch.Tensor, context: int):
        self.model = model
        b = tokens.shape[0]
        positions = torch.full((b,), context, dtype=torch.long, device=tokens.device)
        self.batch = ForwardBatch(tokens, positions, b, _paged(b, context + 1, 1, tokens.device), None)
        self.logits = torch.empty(b, model.config.vocab_size, dtype=torch.float32, device=tokens.device)

    def eager(self) -> torch.Tensor:
        """Run the step; float32 logits [B, V]."""
        return self.model.forward(self.batch)

    def recorded(self) -> Callable[[], None] | None:
        """The step recorded for replay (backend.graph_runner; it writes self.logits), or None."""
        return self.model.backend.graph_runner(lambda: self.logits.copy_(self.model.forward(self.batch)))


class ExpertCounter:
    """Counts the distinct routed experts each MoE layer runs, by wrapping backend.moe_experts."""

    def __init__(self, backend: Backend):
        self.backend, self.hits = backend, []

    def __enter__(self) -> "ExpertCounter":
        original = self.backend.moe_experts

        def counting(x, weights, ids, experts):
            self.hits.append(int((ids.unique() >= 0).sum()))  # -1 marks a skipped pair, not an expert
            return original(x, weights, ids, experts)

        self.backend.moe_experts = counting  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        del self.backend.moe_experts


# ---- timing and profile ----------------------------------------------------------------------

def profile_step(fn: Callable[[], object], steps: int = 3, top: int = 15) -> dict:
    """The top kernels (device time; CPU ops where no device activity is recorded) of `steps` calls.

    Returns:
        {"by": "device" or "cpu", "step_us": time per step summed over every row, "rows": [{"name",
        "calls_per_step", "us_per_step", "percent"}]}.
    """
    from torch.autograd import DeviceType
    from torch.profiler import profile, supported_activities

    fn()
    with profile(activities=list(supported_activities())) as prof:
        for _ in range(steps):
            fn()
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()
    averages = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    kernels = [e for e in averages if e.device_type != DeviceType.CPU and device_us(e) > 0]
    if kernels:
        by, rows = "device", [(e.key, e.count, device_us(e)) for e in kernels]
    else:
        by, rows = "cpu", [(e.key, e.count, float(e.self_cpu_time_total)) for e in averages]
    total = sum(us for _, _, us in rows) / steps
    rows.sort(key=lambda row: -row[2])
    return {"by": by, "steps": steps, "step_us": total,
            "rows": [{"name": name, "calls_per_step": count / steps, "us_per_step": us / steps,
                      "percent": 100.0 * us / steps / total if total else 0.0} for name, count, us in rows[:top]]}


def format_profile(profile: dict) -> str:
    lines = [f"top {len(profile['rows'])} by {profile['by']} time, {profile['step_us'] / 1e3:.3f} ms per step "
             f"({profile.get('what', '')})",
             f"{'us/step':>10} {'%':>6} {'calls':>6}  name"]
    for row in profile["rows"]:
        lines.append(f"{row['us_per_step']:10.1f} {row['percent']:6.1f} {row['calls_per_step']:6.1f}  "
                     f"{row['name'][:100]}")
    return "\n".join(lines)


