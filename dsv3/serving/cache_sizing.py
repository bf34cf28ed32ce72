"""How many cache blocks to allocate: what the device has left after the weights and activations.

On an accelerator (vLLM's rule): after loading, a profiling forward of max_num_batched_tokens tokens
measures the activation peak; the blocks get gpu_memory_utilization x total memory, less what is in
use (weights, other processes) and less that peak, less the sampler's logits. On the CPU the cache
holds cache_tokens tokens (default DEFAULT_CPU_CACHE_TOKENS, less where the host is short of memory).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from dsv3.errors import Dsv3Error
from dsv3.model import Transformer

DEFAULT_CPU_CACHE_TOKENS = 65536
GiB = 1 << 30


@dataclass(frozen=True)
class CachePlan:
    """num_blocks: blocks per layer pool, the scratch block included; the line to print (layout: what it
    adds about the pool's format, "" for the dense cache)."""

    num_blocks: int
    block_size: int
    num_bytes: int
    layout: str = ""

    @property
    def num_tokens(self) -> int:
        """Tokens the sequences can use (the scratch block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    def describe(self) -> str:
        line = f"cache: {self.num_blocks - 1} blocks = {self.num_tokens} tokens ({self.num_bytes / GiB:.2f} GiB)"
        return f"{line}; {self.layout}" if self.layout else line


def plan_cache(model: Transformer, block_size: int, max_model_len: int, max_num_seqs: int,
               max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9,
               cache_tokens: int | None = None, agree=None, name=str, kv_cache_dtype: str | None = None
               ) -> CachePlan:
    """The cache that fits; raises Dsv3Error, naming the setting to change, when it cannot hold one request.

    Args:
        agree: where ranks must agree (tensor/expert parallel), a function taking this rank's block
            count and returning the count every rank uses (the smallest).
        name: how the message names a setting (EngineArgs.name: the keyword, or the CLI's flag).
        kv_cache_dtype: the latent cache type the pools will have (None: that of the model's pools now).
    """
    per_block = model.cache_bytes_per_block(block_size, kv_cache_dtype)
    memory = model.backend.memory_info()
    if cache_tokens is not None:
        num_blocks, setting = 1 + -(-cache_tokens // block_size), "cache_tokens"
    elif memory.accelerator:
        budget = _accelerator_budget(model, memory, max_model_len, max_num_seqs, max_num_batched_tokens,
                                     gpu_memory_utilization, block_size, kv_cache_dtype)
        num_blocks, setting = max(budget // per_block, 0), "gpu_memory_utilization"
    else:
        tokens = min(DEFAULT_CPU_CACHE_TOKENS, memory.free // 4 // max(per_block // block_size, 1))
        num_blocks, setting = 1 + max(tokens, max_model_len) // block_size, "cache_tokens"
    if agree is not None:
        num_blocks = agree(num_blocks)
    spec = model.cache_spec_for(1, block_size, kv_cache_dtype)
    layout = f"FP8 latent cache, {spec.bytes_per_token} bytes per token per layer" if spec.kind == "fp8_ds_mla" else ""
    plan = CachePlan(num_blocks, block_size, num_blocks * per_block, layout)
    needed = -(-max_model_len // block_size)
    if num_blocks - 1 < needed:
        raise Dsv3Error(f"{plan.describe()} cannot hold one request of max_model_len={max_model_len} "
                        f"({needed} blocks of {block_size}); raise {name(setting)} or lower {name('max_model_len')}")
    return plan


def _accelerator_budget(model: Transformer, memory, max_model_len: int, max_num_seqs: int,
                        max_num_batched_tokens: int, utilization: float, block_size: int,
                        kv_cache_dtype: str | None) -> int:
    """Bytes left for the cache: utilization x total - in use now - the profiled activation peak."""
    backend = model.backend
    backend.synchronize()
    gc.collect()
    if torch.accelerator.is_available() and hasattr(torch.accelerator, "empty_cache"):
        # the allocator's cached blocks would count as in use
        torch.accelerator.empty_cache()
    before = backend.memory_info(reset_peak=True)
    profile_forward(model, max_num_batched_tokens, max_model_len, block_size, kv_cache_dtype)
    backend.synchronize()
    after = backend.memory_info()
    activations = max(after.peak - before.allocated, 0)
    sampler = 4 * max_num_seqs * model.config.vocab_size * 4  # logits and the sampler's sorted copies
    in_use = before.total - before.free
    return int(utilization * before.total) - in_use - activations - sampler


def profile_forward(model: Transformer, num_tokens: int, max_model_len: int, block_size: int,
                    kv_cache_dtype: str | None = None) -> None:
    """One prefill of `num_tokens` tokens (in sequences up to max_model_len) over scratch pools of the latent
    cache type the engine's will have."""
    length = min(num_tokens, max_model_len)
    sequences = max(num_tokens // length, 1)
    tokens = torch.zeros(sequences, length, dtype=torch.long)
    batch, caches = model._whole_sequences(tokens, len(model.layers), kv_cache_dtype)
    batch.logits_indices = torch.arange(length - 1, sequences * length, length, device=batch.tokens.device)
    model.forward(batch, caches)
    del caches
