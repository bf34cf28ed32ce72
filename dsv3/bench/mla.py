"""`dsv3 bench mla`: MLA decode (and prefill) at DeepSeek-V3 shapes beside its peers.

Decode cases: 16 heads (one GPU of TP8, memory-bound) and 128 heads (no TP,
compute-bound), batch 1, 16, 64, 128, context 4k-32k, every sequence at full
length. Peers in the same run: the same absorbed attention written in plain
torch BF16 (bmm, fp32 softmax) and, on a few small cases, the reference
backend. Bytes are the cache bytes the op must read (batch x context x 576 x 2
for BF16); FLOPs are 2 x batch x heads x context x (576 + 512).

Run through `dsv3 bench mla` (which calls `run`).
"""

from __future__ import annotations

from typing import Callable

import torch

from dsv3.backends.interface import Backend, MLAWeights
from dsv3.bench.common import (
    Record,
    rotation_count,
    run_case,
)

NOPE, ROPE, RANK, V_DIM = 128, 64, 512, 128
SOFTMAX_SCALE = (NOPE + ROPE) ** -0.5
HEADS = (16, 128)
BATCHES = (1, 16, 64, 128)
CONTEXTS = (4096, 8192, 16384, 32768)
QUICK = [(16, 64, 4096), (16, 64, 32768), (128, 64, 4096), (128, 64, 32768), (16, 1, 32768), (128, 1, 4096)]
REFERENCE_CASES = {(16, 1, 4096), (16, 16, 4096), (128, 1, 4096), (128, 16, 4096)}
PREFILL_CASES = [(128, 1, 4096, 0), (128, 1, 512, 3584), (16, 4, 4096, 0)]  # heads, batch, tokens, start_pos


def decode_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(heads, batch, context) to time."""
    if quick:
        return QUICK
    return [(h, b, s) for h in HEADS for b in BATCHES for s in CONTEXTS]


def _weights(backend: Backend, heads: int, device, generator) -> MLAWeights:
    kv_b = torch.randn(heads * (NOPE + V_DIM), RANK, device=device, generator=generator) * RANK ** -0.5
    return backend.prepare_mla(kv_b, heads, NOPE, V_DIM, torch.bfloat16)


def _decode_inputs(batch: int, heads: int, context: int, device, generator) -> tuple:
    """One input set: queries, the new token, a random full cache, rows and positions (length = context)."""
    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator, dtype=torch.bfloat16)

    cache = rand(batch, context, RANK + ROPE)
    slots = torch.arange(batch, device=device)
    positions = torch.full((batch,), context - 1, device=device)
    return (rand(batch, heads, NOPE), rand(batch, heads, ROPE), rand(batch, RANK), rand(batch, ROPE), cache, slots,
            positions)


def torch_absorbed_decode(weights: MLAWeights) -> Callable:
    """The torch BF16 peer: absorbed MLA over cache[:B] with bmm and an fp32 softmax (all sequences full)."""
    w_uk, w_uv = weights.w_uk.to(torch.bfloat16), weights.w_uv.to(torch.bfloat16)

    def decode(q_nope, q_pe, latent, k_pe, cache, slots, positions):
        cache[slots, positions] = torch.cat((latent, k_pe), dim=-1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        query = torch.cat((q_latent, q_pe), dim=-1)  # [B, H, 576]
        kv = cache[:query.shape[0]]  # slots are 0..B-1 here: a view, no gather
        scores = torch.bmm(query, kv.transpose(1, 2)).float() * SOFTMAX_SCALE  # [B, H, S]
        probs = scores.softmax(dim=-1).to(torch.bfloat16)
        out_latent = torch.bmm(probs, kv[..., :RANK])  # [B, H, 512]
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    return decode


def bench_decode(backend: Backend, reference: Backend | None, device, records: list[Record], heads: int, batch: int,
                 context: int) -> None:
    generator = torch.Generator(device).manual_seed(heads * batch + context)
    case = f"decode H={heads} B={batch} S={context}"
    flops = 2.0 * batch * heads * context * (RANK + ROPE + RANK)
    cache_bytes = float(batch * context * (RANK + ROPE) * 2)
    bound = "copy" if heads <= 16 else "bf16"
    ours = f"dsv3 {backend.capabilities.name}: {backend.capabilities.ops.get('mla_decode', 'mla_decode')}"
    try:
        weights = _weights(backend, heads, device, generator)
        inputs = [_decode_inputs(batch, heads, context, device, generator)
                  for _ in range(rotation_count(int(cache_bytes)))]
    except torch.OutOfMemoryError:
        records.append(Record("mla", case, ours, True, flops, cache_bytes, bound, error="inputs do not fit in memory"))
        return

    def run_ours(*args):
        return backend.mla_decode(*args, weights, SOFTMAX_SCALE)

    run_case(records, "mla", case, ours, run_ours, inputs, backend, flops, cache_bytes, bound, ours=True)
    run_case(records, "mla", case, "torch bf16 absorbed (bmm, fp32 softmax)", torch_absorbed_decode(weights),
             inputs, backend, flops, cache_bytes, bound)
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
    args = (rand(batch, tokens, heads, NOPE), rand(batch, tokens, heads, ROPE), rand(batch, tokens, RANK),
            rand(batch, tokens, ROPE), rand(batch, end, RANK + ROPE), torch.arange(batch, device=device))
    run_case(records, "mla", case, ours,
             lambda *a: backend.mla_prefill(*a, start_pos, weights, SOFTMAX_SCALE), [args], backend, flops,
             bytes_moved, "bf16", ours=True, graph=False)
    if reference is not None and heads * batch * tokens * end <= 128 * 4096 * 4096:
        ref_weights = _weights(reference, heads, device, torch.Generator(device).manual_seed(0))
        run_case(records, "mla", case, "reference backend (fp32)",
                 lambda *a: reference.mla_prefill(*a, start_pos, ref_weights, SOFTMAX_SCALE), [args], backend,
                 flops, bytes_moved, "bf16", graph=False, target_ms=20.0)


def run_mla_bench(backend: Backend, device, records: list[Record], quick: bool = False,
                  reference: Backend | None = None) -> None:
    """Append MLA decode and prefill records for `backend` and its peers (`reference` on a few cases)."""
    for heads, batch, context in decode_cases(quick):
        bench_decode(backend, reference, device, records, heads, batch, context)
    for heads, batch, tokens, start_pos in PREFILL_CASES[:1] if quick else PREFILL_CASES:
        bench_prefill(backend, reference, device, records, heads, batch, tokens, start_pos)


def run(backend: Backend, quick: bool = False, reference: bool = True) -> list[Record]:
    """The records of `dsv3 bench mla` for `backend` (the reference backend as a peer where `reference`)."""
    from dsv3.backends.reference import ReferenceBackend

    records: list[Record] = []
    run_mla_bench(backend, backend.device, records, quick,
                  reference=ReferenceBackend(backend.device) if reference else None)
    return records

