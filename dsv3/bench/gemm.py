"""`dsv3 bench gemm`: the FP8 linear at every DeepSeek-V3 shape, beside torch._scaled_mm block-wise,
torch BF16 matmul and the reference backend.

dsv3's rows: "gemm" is the backend's GEMM on activations already quantized (what the peers
compute), "linear" the whole op the model calls (1x128 quantization + GEMM). Bytes counted: the
FP8 weight, the BF16 activations in and the BF16 output (the block scales are under 1%).
"""

from __future__ import annotations

import torch

from dsv3.backends import fp8
from dsv3.backends.interface import Backend
from dsv3.bench.common import (
    Record,
    column_major,
    random_fp8,
    rotation_count,
    run_case,
    scaled_mm_blockwise,
)

#: (N, K): fused q_a+kv_a, q_b, kv_b, o_proj, expert w1+w3, expert w2, kv_a alone
SHAPES: tuple[tuple[int, int], ...] = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168),
                                       (7168, 2048), (576, 7168))
DECODE_M: tuple[int, ...] = (1, 16, 64, 128)
PREFILL_M: tuple[int, ...] = (4096,)
#: (M, N, K) where the (slow) reference backend is timed too
REFERENCE_CASES = {(1, 7168, 16384), (64, 4096, 7168), (4096, 7168, 2048)}


def _weight_sets(n: int, k: int, copies: int, device, generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    scale = torch.rand(fp8.num_blocks(n), fp8.num_blocks(k), device=device, generator=generator) * 1e-3 + 5e-4
    base = random_fp8(n, k, torch.float8_e4m3fn, device, generator)
    return [(base.clone(), scale.clone()) for _ in range(copies)]


def run(backend: Backend, quick: bool = False, reference: bool = True, shapes=SHAPES,
        m_values: tuple[int, ...] | None = None) -> list[Record]:
    """Time every (M, N, K) case; returns the records (ratios and roofline filled in by common.finish)."""
    device = backend.device
    g = torch.Generator(device).manual_seed(0)
    ref = None
    if reference:
        from dsv3.backends.reference import ReferenceBackend

        ref = ReferenceBackend(device)
    m_values = m_values or ((1, 64, 4096) if quick else DECODE_M + PREFILL_M)
    shapes = shapes[:3] if quick else shapes
    has_fp8 = backend.capabilities.has_fp8
    records: list[Record] = []
    for n, k in shapes:
        weight_bytes = n * k
        raw = _weight_sets(n, k, rotation_count(weight_bytes), device, g)
        prepared = [backend.prepare_linear(w, s, "fp8" if has_fp8 else "bf16") for w, s in raw]
        dense = [fp8.dequantize_blocks(w, s, torch.bfloat16) for w, s in raw[:rotation_count(2 * weight_bytes)]]
        for m in m_values:
            case = f"M={m} N={n} K={k}"
            flops, moved = 2.0 * m * n * k, weight_bytes + 2.0 * m * (k + n)
            xs = [torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16) for _ in prepared]
            if has_fp8:
                impl = backend.linear_impl(m, prepared[0])
                quantized = [backend.quantize_activation(x) for x in xs]
                run_case(records, "gemm", case, f"dsv3 {backend.capabilities.name} gemm: {impl}",
                         lambda qa, sa, w: backend.fp8_gemm(qa, sa, w),
                         [(qa, column_major(sa), w) for (qa, sa), w in zip(quantized, prepared)],
                         backend, flops, moved, "fp8_blockwise", ours=True)
                run_case(records, "gemm", case, f"dsv3 {backend.capabilities.name} linear (quant + gemm)",
                         backend.linear, list(zip(xs, prepared)), backend, flops, moved, "fp8_blockwise", ours=True)
                torch_quantized = [fp8.quantize_activation(x) for x in xs]
                run_case(records, "gemm", case, "torch._scaled_mm block-wise", scaled_mm_blockwise,
                         [(qa, column_major(sa), w, s) for (qa, sa), (w, s) in zip(torch_quantized, raw)],
                         backend, flops, moved, "fp8_blockwise")
            else:
                run_case(records, "gemm", case, f"dsv3 {backend.capabilities.name} linear (bf16)", backend.linear,
                         list(zip(xs, prepared)), backend, flops, 2.0 * weight_bytes + 2.0 * m * (k + n), "bf16",
                         ours=True)
            run_case(records, "gemm", case, "torch BF16 matmul", lambda x, w: x @ w.t(),
                     list(zip(xs, dense)), backend, flops, 2.0 * weight_bytes + 2.0 * m * (k + n), "bf16")
            if ref is not None and (m, n, k) in REFERENCE_CASES:
                ref_weights = [ref.prepare_linear(w, s, "fp8") for w, s in raw[:2]]
                run_case(records, "gemm", case, "reference backend (torch, emulated fp8)", ref.linear,
                         list(zip(xs, ref_weights)), backend, flops, moved, "fp8_blockwise", graph=False,
                         target_ms=20)
            del xs
        del raw, prepared, dense
    return records
