"""The paged latent cache's layouts: what a pool looks like (`CacheSpec`), the dense pool, the FP8 latent
cache's byte format (vLLM's fp8_ds_mla) with its reads and writes, and the `--kv-cache-dtype` values.

A backend's `mla_cache_spec` picks one of these layouts; the reference backend reads and writes the FP8
rows with `write_fp8_cache` / `read_fp8_cache`, the Triton kernels the same bytes in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError


@dataclass(frozen=True)
class CacheSpec:
    """One layer's paged latent cache as a backend lays it out: a pool of fixed-size blocks.

    Attributes:
        shape: the cache tensor's shape (default [num_blocks, block_size, kv_lora_rank + rope_dim]).
        dtype: its element type.
        layout: a sentence saying how tokens sit in the tensor.
        bytes_per_token: cache bytes one token takes.
        num_blocks: blocks in the pool (block 0 is the engine's scratch block).
        block_size: tokens per block.
        kind: "dense" (latent and rope key in `dtype`) or "fp8_ds_mla" (the FP8 latent cache:
            fp8_latent_cache_spec).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    bytes_per_token: int
    num_blocks: int
    block_size: int
    kind: Literal["dense", "fp8_ds_mla"] = "dense"

    @property
    def num_tokens(self) -> int:
        """Tokens the pool holds."""
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def num_bytes(self) -> int:
        """Bytes of one layer's pool."""
        return self.num_blocks * self.bytes_per_block


def paged_cache_spec(num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                     dtype: torch.dtype) -> CacheSpec:
    """The default pool layout [num_blocks, block_size, kv_lora_rank + rope_dim]: one row per token."""
    if num_blocks < 1 or block_size < 1:
        raise BackendError(f"MLA cache: num_blocks and block_size must be at least 1, "
                           f"got {num_blocks} and {block_size}")
    width = kv_lora_rank + rope_dim
    return CacheSpec(shape=(num_blocks, block_size, width), dtype=dtype,
                     layout="[num_blocks, block_size, kv_lora_rank + rope_dim]",
                     bytes_per_token=width * torch.empty((), dtype=dtype).element_size(),
                     num_blocks=num_blocks, block_size=block_size)


#: --kv-cache-dtype: auto (the activation dtype), bf16, or fp8 (the FP8 latent cache, fp8_latent_cache_spec)
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp8")


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """Raises BackendError naming --kv-cache-dtype for a value not in KV_CACHE_DTYPES."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise BackendError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def dense_cache_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The element type of a dense pool: bf16 for "bf16", else the activation dtype `dtype`."""
    check_kv_cache_dtype(kv_cache_dtype)
    return torch.bfloat16 if kv_cache_dtype == "bf16" else dtype


def fp8_latent_cache_spec(num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                          rope_dtype: torch.dtype, fp8_dtype: torch.dtype) -> CacheSpec:
    """The FP8 latent cache (vLLM's fp8_ds_mla): one row of bytes per token, in a pool of `fp8_dtype`.

    A row holds the kv_lora_rank latent in `fp8_dtype`, then one float32 scale per 128-element tile of it
    (ceil(kv_lora_rank / 128)), then the rope key in `rope_dtype` (the activation dtype: BF16, or FP32 on
    the fp32 precision path): 512 + 16 + 128 = 656 bytes for DeepSeek-V3 in BF16, against 1152. The pool
    is [num_blocks, block_size, row bytes] of `fp8_dtype`, so block sizes and block tables work as in the
    dense pool and the tensor itself says which FP8 format it holds; `fp8_cache_views` gives the typed
    views. Latents are quantized as activations are (fp8.quantize_activation with the format's
    FP8_ACTIVATION_MAX: 448 for e4m3fn, 224 for e4m3fnuz).
    """
    if num_blocks < 1 or block_size < 1:
        raise BackendError(f"MLA cache: num_blocks and block_size must be at least 1, "
                           f"got {num_blocks} and {block_size}")
    if kv_lora_rank % 4:
        raise BackendError(f"--kv-cache-dtype fp8: kv_lora_rank {kv_lora_rank} is not a multiple of 4 (the "
                           "float32 scales after the latent would be unaligned)")
    width = fp8_row_bytes(kv_lora_rank, rope_dim, rope_dtype)
    return CacheSpec(shape=(num_blocks, block_size, width), dtype=fp8_dtype,
                     layout=(f"[num_blocks, block_size, {width}] bytes: latent {kv_lora_rank} x "
                             f"{str(fp8_dtype).removeprefix('torch.')}, {fp8.num_blocks(kv_lora_rank)} float32 "
                             f"scales (one per 128 latent values), rope key {rope_dim} x "
                             f"{str(rope_dtype).removeprefix('torch.')}"),
                     bytes_per_token=width, num_blocks=num_blocks, block_size=block_size, kind="fp8_ds_mla")


def fp8_row_bytes(kv_lora_rank: int, rope_dim: int, rope_dtype: torch.dtype) -> int:
    """Bytes of one token's row in the FP8 latent cache."""
    return kv_lora_rank + 4 * fp8.num_blocks(kv_lora_rank) + rope_dim * torch.empty((), dtype=rope_dtype).element_size()


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """Whether a pool is the FP8 latent cache (its element type is an FP8 format)."""
    return cache.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def fp8_cache_views(cache: torch.Tensor, kv_lora_rank: int, rope_dim: int,
                    rope_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The typed views of an FP8 latent cache [num_blocks, block_size, row bytes] (fp8_latent_cache_spec).

    Returns:
        (latent [num_blocks, block_size, C] FP8, scales [num_blocks, block_size, ceil(C/128)] float32,
        rope [num_blocks, block_size, R] rope_dtype), each sharing the pool's storage.
    """
    width = fp8_row_bytes(kv_lora_rank, rope_dim, rope_dtype)
    if cache.dim() != 3 or cache.shape[-1] != width or cache.stride(-1) != 1 or cache.stride(1) != width:
        raise BackendError(f"FP8 MLA cache: expected a [num_blocks, block_size, {width}] pool with contiguous rows "
                           f"(latent {kv_lora_rank}, rope {rope_dim} x {rope_dtype}), found shape "
                           f"{tuple(cache.shape)} strides {cache.stride()}")
    scales_end = kv_lora_rank + 4 * fp8.num_blocks(kv_lora_rank)
    raw = cache.view(torch.uint8)
    return (cache[..., :kv_lora_rank], raw[..., kv_lora_rank:scales_end].view(torch.float32),
            raw[..., scales_end:].view(rope_dtype))


def fp8_cache_max(cache: torch.Tensor) -> float:
    """The value a latent tile's amax maps to in this FP8 cache (the format's activation max)."""
    return fp8.FP8_ACTIVATION_MAX[fp8.format_name(cache.dtype)]


def write_fp8_cache(cache: torch.Tensor, rows: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Quantize latent [N, C] per 128-element tile (fp8.quantize_activation) and store it, its scales and
    k_pe [N, R] (in its own dtype) at the pool rows `rows` int64 [N] (block * block_size + offset)."""
    views = fp8_cache_views(cache, latent.shape[-1], k_pe.shape[-1], k_pe.dtype)
    q, scales = fp8.quantize_activation(latent, cache.dtype, fp8_cache_max(cache))
    for view, values in zip(views, (q, scales, k_pe), strict=True):
        flat = view.view(torch.uint8) if view.dtype == cache.dtype else view  # index_put on bytes: any device
        flat.view(-1, *flat.shape[2:])[rows] = values.view(torch.uint8) if view.dtype == cache.dtype else values


def read_fp8_cache(cache: torch.Tensor, rows: torch.Tensor, kv_lora_rank: int, rope_dim: int,
                   rope_dtype: torch.dtype) -> torch.Tensor:
    """float32 [..., C + R] of the pool rows `rows` int64 [...]: latent x its tile's scale, then the rope key."""
    latent, scales, rope = (v.view(-1, *v.shape[2:]) for v in fp8_cache_views(cache, kv_lora_rank, rope_dim,
                                                                                  rope_dtype))
    q = latent.view(torch.uint8)[rows].view(cache.dtype).float()
    tile_scales = scales[rows].repeat_interleave(fp8.BLOCK, dim=-1)[..., :kv_lora_rank]
    return torch.cat((q * tile_scales, rope[rows].float()), dim=-1)
