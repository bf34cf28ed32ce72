"""`dsv3 bench mla`: MLA decode (and prefill) at DeepSeek-V3 shapes beside its peers.

Decode cases: 16 heads (one GPU of TP8, memory-bound) and 128 heads (no TP,
compute-bound), batch 1, 16, 64, 128, context 4k-32k, every sequence at full
length. Peers in the same run: the same absorbed attention written in plain
torch BF16 (bmm, fp32 softmax) and, on a few small cases, the reference
backend. `--kv-cache-dtype fp8` times decode over the FP8 latent cache (656 bytes
per token) with dsv3 on the BF16 cache as one more peer. The cache is a pool of
64-token blocks, each sequence's blocks in random order (as an engine's block
tables leave them). Bytes are the cache bytes the op
must read (batch x context x 576 x 2 for BF16); FLOPs are 2 x batch x heads x
context x (576 + 512).

Run through `dsv3 bench mla` (which calls `run`).
"""

from __future__ import annotations

from typing import Callable

import torch

from dsv3.backends.interface import Backend, MLAInputs, MLAWeights, PagedBatch
from dsv3.backends.latent_cache import write_fp8_cache
from dsv3.bench.common import Record, op_record, rotation_count, run_case

NOPE, ROPE, RANK, V_DIM = 128, 64, 512, 128
SOFTMAX_SCALE = (NOPE + ROPE) ** -0.5
HEADS = (16, 128)
BATCHES = (1, 16, 64, 128)
CONTEXTS = (4096, 8192, 16384, 32768)
QUICK = [(16, 64, 4096), (16, 64, 32768), (128, 64, 4096), (128, 64, 32768), (16, 1, 32768), (128, 1, 4096)]
REFERENCE_CASES = {(16, 1, 4096), (16, 16, 4096), (128, 1, 4096), (128, 16, 4096)}
PREFILL_CASES = [(128, 1, 4096, 0), (128, 1, 512, 3584), (16, 4, 4096, 0)]  # heads, batch, tokens, start_pos
BLOCK_SIZE = 64


def decode_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(heads, batch, context) to time."""
    if quick:
        return QUICK
    return [(h, b, s) for h in HEADS for b in BATCHES for s in CONTEXTS]


def _weights(backend: Backend, heads: int, device, generator) -> MLAWeights:
    kv_b = torch.randn(heads * (NOPE + V_DIM), RANK, device=device, generator=generator) * RANK ** -0.5
    return backend.prepare_mla(kv_b, heads, NOPE, V_DIM, torch.bfloat16)


def paged_pool(batch: int, context: int, device, generator, backend: Backend | None = None,
               kv_cache_dtype: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """A random pool holding `batch` sequences of `context` tokens in BLOCK_SIZE blocks, block 0 left free,
    and their block tables (int32 [batch, blocks per sequence]) in random order. BF16 rows, or with
    kv_cache_dtype "fp8" the backend's FP8 latent layout, written through its quantization."""
    per_seq = -(-context // BLOCK_SIZE)
    num_blocks = 1 + batch * per_seq
    order = torch.randperm(batch * per_seq, device=device, generator=generator) + 1
    if kv_cache_dtype == "bf16":
        pool = torch.randn(num_blocks, BLOCK_SIZE, RANK + ROPE, device=device, generator=generator,
                           dtype=torch.bfloat16)
        return pool, order.view(batch, per_seq).to(torch.int32)
    pool = backend.allocate_mla_cache(backend.mla_cache_spec(num_blocks, BLOCK_SIZE, RANK, ROPE, torch.bfloat16,
                                                             kv_cache_dtype))
    rows, chunk = num_blocks * BLOCK_SIZE, 1 << 18
    for start in range(0, rows, chunk):
        index = torch.arange(start, min(rows, start + chunk), device=device)
        write_fp8_cache(pool, index, torch.randn(len(index), RANK, device=device, generator=generator).bfloat16(),
                        torch.randn(len(index), ROPE, device=device, generator=generator).bfloat16())
    return pool, order.view(batch, per_seq).to(torch.int32)


def cache_bytes_per_token(backend: Backend, kv_cache_dtype: str) -> int:
    return backend.mla_cache_spec(1, BLOCK_SIZE, RANK, ROPE, torch.bfloat16, kv_cache_dtype).bytes_per_token


def _decode_inputs(batch: int, heads: int, context: int, device, generator, backend: Backend | None = None,
                   kv_cache_dtype: str = "bf16") -> tuple:
    """One input set: the new tokens, a random full pool and the batch (every sequence context tokens long)."""
    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=torch.bfloat16)

    pool, tables = paged_pool(batch, context, device, generator, backend, kv_cache_dtype)
    paged = PagedBatch(tables, torch.full((batch,), context, dtype=torch.int32, device=device),
                       torch.arange(batch + 1, dtype=torch.int32, device=device), 1, context)
    inputs = MLAInputs(rand(batch, heads, NOPE), rand(batch, heads, ROPE), rand(batch, RANK), rand(batch, ROPE))
    return inputs, pool, paged


def torch_absorbed_decode(weights: MLAWeights) -> Callable:
    """The torch BF16 peer: absorbed MLA with bmm and an fp32 softmax over each sequence's blocks gathered
    through its table (all sequences full)."""
    w_uk, w_uv = weights.w_uk.to(torch.bfloat16), weights.w_uv.to(torch.bfloat16)

    def decode(inputs: MLAInputs, pool: torch.Tensor, batch: PagedBatch):
        last = batch.seq_lens.long() - 1
        rows = batch.block_tables.long().gather(1, (last // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE + last % BLOCK_SIZE
        pool.view(-1, RANK + ROPE)[rows] = torch.cat((inputs.latent, inputs.k_pe), dim=-1)
        q_latent = torch.bmm(inputs.q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        query = torch.cat((q_latent, inputs.q_pe), dim=-1)  # [B, H, 576]
        # [B, S, 576]: the gather a torch paged cache needs (every sequence is max_seq_len long here)
        kv = pool[batch.block_tables.long()].flatten(1, 2)[:, :batch.max_seq_len]
        scores = torch.bmm(query, kv.transpose(1, 2)).float() * SOFTMAX_SCALE  # [B, H, S]
        probs = scores.softmax(dim=-1).to(torch.bfloat16)
        out_latent = torch.bmm(probs, kv[..., :RANK])  # [B, H, 512]
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    return decode


def bench_decode(backend: Backend, reference: Backend | None, device, records: list[Record], heads: int, batch: int,
                 context: int, kv_cache_dtype: str = "bf16") -> None:
    """One decode case. With kv_cache_dtype "fp8" dsv3's row reads the FP8 latent cache and dsv3 on the BF16
    cache joins the peers (its "vs" column is the FP8 cache's speed-up)."""
    generator = torch.Generator(device).manual_seed(heads * batch + context)
    case = f"decode H={heads} B={batch} S={context}"
    flops = 2.0 * batch * heads * context * (RANK + ROPE + RANK)
    bf16_bytes = float(batch * context * (RANK + ROPE) * 2)
    cache_bytes = float(batch * context * cache_bytes_per_token(backend, kv_cache_dtype))
    bound = "copy" if heads <= 16 else "bf16"
    impl = f"dsv3 {backend.capabilities.name}: {backend.capabilities.ops.get('mla_decode', 'mla_decode')}"
    ours = impl if kv_cache_dtype == "bf16" else f"{impl}, {kv_cache_dtype} latent cache"
    try:
        weights = _weights(backend, heads, device, generator)
        inputs = [_decode_inputs(batch, heads, context, device, generator, backend, kv_cache_dtype)
                  for _ in range(rotation_count(int(cache_bytes)))]
    except torch.OutOfMemoryError:
        records.append(op_record("mla", case, ours, True, flops, cache_bytes, bound,
                                 error="inputs do not fit in memory"))
        return

    def run_ours(*args):
        return backend.mla_decode(*args, weights, SOFTMAX_SCALE)

    run_case(records, "mla", case, ours, run_ours, inputs, backend, flops, cache_bytes, bound, ours=True)
    if kv_cache_dtype != "bf16":
        del inputs
        inputs = [_decode_inputs(batch, heads, context, device, generator)
                  for _ in range(rotation_count(int(bf16_bytes)))]
        run_case(records, "mla", case, f"{impl}, bf16 latent cache", run_ours, inputs, backend, flops, bf16_bytes,
                 bound)
    run_case(records, "mla", case, "torch bf16 absorbed (bmm, fp32 softmax)", torch_absorbed_decode(weights),
             inputs, backend, flops, bf16_bytes, bound)
    if reference is not None and (heads, batch, context) in REFERENCE_CASES:
        ref_weights = _weights(reference, heads, device, torch.Generator(device).manual_seed(0))
        run_case(records, "mla", case, "reference backend (fp32)",
                 lambda *args: reference.mla_decode(*args, ref_weights, SOFTMAX_SCALE), inputs, backend,
                 flops, cache_bytes, bound, graph=False, target_ms=20.0)
    del inputs


def bench_prefill(backend: Backend, reference: Backend | None, device, records: list[Record], heads: int,
                  batch: int, tokens: int, start_pos: int) -> None:
    """Causal prefill of `tokens` new tokens after a cached prefix of `start_pos`."""
    generator = torch.Generator(device).manual_seed(heads + tokens + start_pos)
    end = start_pos + tokens
    case = f"prefill H={heads} B={batch} T={tokens} prefix={start_pos}"
    attended = batch * heads * sum(start_pos + t + 1 for t in range(tokens))  # (query, key) pairs kept
    flops = 2.0 * attended * (NOPE + ROPE + V_DIM) + 2.0 * batch * end * RANK * heads * (NOPE + V_DIM)
    bytes_moved = float(batch * end * (RANK + ROPE) * 2)
    ours = f"dsv3 {backend.capabilities.name}: {backend.capabilities.ops.get('mla_prefill', 'mla_prefill')}"

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=torch.bfloat16)

    weights = _weights(backend, heads, device, generator)
    n = batch * tokens
    pool, tables = paged_pool(batch, end, device, generator)
    paged = PagedBatch(tables, torch.full((batch,), end, dtype=torch.int32, device=device),
                       torch.arange(0, n + 1, tokens, dtype=torch.int32, device=device), tokens, end)
    args = (MLAInputs(rand(n, heads, NOPE), rand(n, heads, ROPE), rand(n, RANK), rand(n, ROPE)), pool, paged)
    run_case(records, "mla", case, ours, lambda *a: backend.mla_prefill(*a, weights, SOFTMAX_SCALE), [args],
             backend, flops, bytes_moved, "bf16", ours=True, graph=False)
    if reference is not None and heads * batch * tokens * end <= 128 * 4096 * 4096:
        ref_weights = _weights(reference, heads, device, torch.Generator(device).manual_seed(0))
        run_case(records, "mla", case, "reference backend (fp32)",
                 lambda *a: reference.mla_prefill(*a, ref_weights, SOFTMAX_SCALE), [args], backend,
                 flops, bytes_moved, "bf16", graph=False, target_ms=20.0)


def run_mla_bench(backend: Backend, device, records: list[Record], quick: bool = False,
                  reference: Backend | None = None, kv_cache_dtype: str = "bf16") -> None:
    """Append MLA decode and prefill records for `backend` and its peers (`reference` on a few cases); with
    an FP8 latent cache the decode cases only (against the BF16 cache)."""
    for heads, batch, context in decode_cases(quick):
        bench_decode(backend, reference if kv_cache_dtype == "bf16" else None, device, records, heads, batch,
                     context, kv_cache_dtype)
    if kv_cache_dtype == "bf16":
        for heads, batch, tokens, start_pos in PREFILL_CASES[:1] if quick else PREFILL_CASES:
            bench_prefill(backend, reference, device, records, heads, batch, tokens, start_pos)


def run(backend: Backend, quick: bool = False, reference: bool = True, kv_cache_dtype: str = "auto") -> list[Record]:
    """The records of `dsv3 bench mla` for `backend` (the reference backend as a peer where `reference`);
    kv_cache_dtype "fp8" times decode over the FP8 latent cache beside the BF16 one."""
    from dsv3.backends.reference import ReferenceBackend

    records: list[Record] = []
    run_mla_bench(backend, backend.device, records, quick,
                  reference=ReferenceBackend(backend.device) if reference else None,
                  kv_cache_dtype="bf16" if kv_cache_dtype == "auto" else kv_cache_dtype)
    return records

