"""The shared Triton backend: the ops the CUDA and ROCm backends both run, from one constructor path.

A vendor backend (backends/cuda.py, backends/rocm.py) finds its chip and device facts and hands
them to `TritonBackend.__init__`: the tile tables (triton_kernels/configs.py or amd_configs.py),
the FP8 dtype and activation max, how torch._scaled_mm takes block scales where it does
(`ScaledMM`, checked once by `check_scaled_mm`) and an optional vendor GEMM (`VendorGemm`,
e.g. aiter) for FP8 linears of prefill-sized M. Everything else is here:

- FP8 linear: activations quantized 1x128 by a Triton kernel; then the split-K Triton GEMM at
  decode sizes (bound by reading the weight once); from scaled_mm_min_m rows the vendor GEMM or
  torch._scaled_mm block-wise where there is one (a ragged N keeps the split-K kernel up to
  decode_max_m: it wins there), else the split-K kernel up to decode_max_m and the tiled Triton
  GEMM above (Capabilities.ops says which, read off the dispatch). _scaled_mm needs K to be a
  multiple of 512 (its weight-scale layout); where it also wants N to be a multiple of 128, such
  weights keep a zero-padded copy (576 -> 640 rows) and the extra columns are dropped.
- BF16/FP32 linear: F.linear (cuBLAS or hipBLASLt).
- RMSNorm (residual add and the 1x128 quantization fused), rotary, SwiGLU, routing (after the
  fp32 router GEMM) and the grouped MoE in Triton; MLA in backends/triton_kernels/mla.py.
Every op of a decode step avoids host synchronisation, so `graph_runner` records a step in a
CUDA (or HIP) graph.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.errors import BackendError
from dsv3.backends.interface import (
    Backend,
    Capabilities,
    ExpertWeights,
    LinearWeight,
    MLAInputs,
    NormOutput,
    OpImpl,
    QuantizedActivation,
    plain,
)
from dsv3.backends.platforms import ChipInfo, Platform
from dsv3.backends.triton_kernels import elementwise, gemm, mla, moe, norm, quant, routing

#: cuBLAS's 128x128 weight scales are [round_up(K/128, 4), N/128] with strides (1, that): the plain
#: transposed scale tensor has this layout when K/128 is a multiple of 4 (every DeepSeek-V3 K is).
SCALED_MM_K_ALIGN = 4 * fp8.BLOCK
#: rows of the activations given to torch._scaled_mm come in multiples of this (16 bytes of fp32 scales)
SCALED_MM_M_ALIGN = 4
GRAPH_WARMUP_RUNS = 2


# ---- library GEMMs, checked once at start ------------------------------------------------------

def matches_block_math(gemm_fn: Callable, fp8_dtype: torch.dtype, device: torch.device | str,
                       shape: tuple[int, int, int] = (32, 256, 512)) -> bool:
    """Whether gemm_fn(a, a_scale, w, w_scale) computes the 1x128 / 128x128 block-scaled product.

    Runs one small product with uneven scales (a per-tensor or per-row shortcut is off by tens of
    percent); an exception counts as no.

    Args:
        gemm_fn: (a [M, K] FP8, a_scale [M, K/128] column-major, w [N, K] FP8, w_scale [N/128, K/128]) -> [M, N].
        fp8_dtype: the FP8 dtype of a and w.
        device: where to run it.
        shape: (M, N, K) of the product.
    """
    m, n, k = shape
    g = torch.Generator(device).manual_seed(0)
    a = (torch.randn(m, k, device=device, generator=g) * 8).to(fp8_dtype)
    w = (torch.randn(n, k, device=device, generator=g) * 8).to(fp8_dtype)
    a_scale = (torch.rand(k // fp8.BLOCK, m, device=device, generator=g) + 0.5).t()
    w_scale = torch.rand(fp8.num_blocks(n), k // fp8.BLOCK, device=device, generator=g) + 0.5
    expected = ((a.float() * a_scale.repeat_interleave(fp8.BLOCK, 1))
                @ (w.float() * fp8.expand_block_scales(w_scale, n, k)).T)
    try:
        got = gemm_fn(a, a_scale, w, w_scale).float()
    except Exception:  # noqa: BLE001 - a library that cannot run this case is simply not used
        return False
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-2,
                                                          atol=1e-2 * expected.abs().max().item())


@dataclass(frozen=True)
class ScaledMM:
    """How torch._scaled_mm block-wise takes 128x128 weight scales here.

    Attributes:
        scale_layout: "view" (the transposed scales as they are) or "contiguous" (made contiguous).
        pad_n: N must be padded to a multiple of 128 (an unaligned N failed or came out wrong).
    """

    scale_layout: str
    pad_n: bool

    def scale_b(self, scale: torch.Tensor) -> torch.Tensor:
        """The weight scales [N/128, K/128] as _scaled_mm takes them."""
        return scale.t() if self.scale_layout == "view" else scale.t().contiguous()


def check_scaled_mm(device: torch.device, fp8_dtype: torch.dtype) -> ScaledMM | None:
    """torch._scaled_mm block-wise where it computes the block math on this device (checked on small
    products), else None."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    for layout in ("view", "contiguous"):
        def run(a, sa, w, sw, layout=layout):
            return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=ScaledMM(layout, False).scale_b(sw),
                                    out_dtype=torch.bfloat16)
        if matches_block_math(run, fp8_dtype, device):
            return ScaledMM(layout, pad_n=not matches_block_math(run, fp8_dtype, device, (32, 320, 512)))
    return None


@dataclass(frozen=True)
class VendorGemm:
    """A vendor library's block-scaled FP8 GEMM for linears of prefill-sized M (aiter on ROCm).

    Attributes:
        name: what Capabilities.ops and linear_impl call it.
        run: (qa [M, K], sa [M, K/128] column-major, w [N, K], w_scale, out_dtype) -> [M, N].
        block_aligned: it takes only N and K that are multiples of 128.
    """

    name: str
    run: Callable[..., torch.Tensor]
    block_aligned: bool = True


# ---- the backend -------------------------------------------------------------------------------

class TritonBackend(Backend):
    """The ops of the shared Triton kernels; cuda.py and rocm.py build it with their chip's facts.

    Args:
        platform: the vendor's Platform (the backend's name, the tile tables, the distributed backend).
        device: its torch device.
        chip: the chip it runs on.
        num_sms: streaming multiprocessors (compute units) the split-K GEMM spreads over.
        fp8_dtype, fp8_max: the FP8 dtype of the kernels and the activation max (None, None without FP8).
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
        scaled_mm: how torch._scaled_mm takes block scales here, or None where it is not used.
        vendor_gemm: a vendor FP8 GEMM used from scaled_mm_min_m rows, or None.
        native: on the platform's own hardware (False: an emulation, whose Triton rejects launch keywords
            only the vendor's compiler takes).
    Capabilities.ops comes from `implementations`: one table for both vendors, written from the limits the
    dispatch reads (the tile tables, linear_impl); a vendor adds only data (`blas`, `op_notes`).
    """

    #: the library torch's F.linear (the BF16 linears, the router GEMM) runs on
    blas = "cuBLAS"
    #: op -> facts the vendor adds to its line in Capabilities.ops
    op_notes: dict[str, tuple[str, ...]] = {}

    def __init__(self, platform: Platform, device: torch.device, chip: ChipInfo, num_sms: int,
                 fp8_dtype: torch.dtype | None, fp8_max: float | None, ue8m0: bool, scaled_mm: ScaledMM | None,
                 vendor_gemm: VendorGemm | None = None, native: bool = True):
        self.platform, self.chip, self.num_sms, self.ue8m0, self.native = platform, chip, num_sms, ue8m0, native
        self.configs = platform.kernel_configs(chip.arch, native)
        self.scaled_mm, self.vendor_gemm = scaled_mm, vendor_gemm
        self._graph_pool = self._graph_stream = None  # made on the first graph_runner call
        self._graphs = weakref.WeakSet()  # the live graphs recorded in _graph_pool
        fp8_max = fp8_max if fp8_dtype is not None else None
        dist_backend = "gloo" if device.type == "cpu" else platform.dist_backend
        self.capabilities = Capabilities(name=platform.backend, device=str(device), fp8_dtype=fp8_dtype,
                                         fp8_max=fp8_max, dist_backend=dist_backend, native_fp8=fp8_dtype is not None,
                                         ops=self.implementations(fp8_dtype, fp8_max))

    def implementations(self, fp8_dtype: torch.dtype | None, fp8_max: float | None) -> dict[str, OpImpl]:
        """What each op runs, from the limits its dispatch reads (for Capabilities.ops)."""
        c, tiles = self.configs, f"{self.chip.arch} tiles"
        if fp8_dtype is None:
            linear_fp8 = OpImpl(f"unavailable on {self.chip.arch} (no FP8): BF16 fallback, FP8 checkpoints "
                                "run dequantized to BF16")
        else:
            fmt = str(fp8_dtype).removeprefix("torch.float8_")
            linear_fp8 = OpImpl(f"triton 1x128 quant to {fmt} (max {fp8_max:g}); {self.linear_fp8_gemms()}")
        mla = "triton (backends/triton_kernels/mla.py)"
        decode_tiles = [self.mla_decode_config(heads, torch.bfloat16) for heads in (16, 128)]
        decode_tiles = (f", {tiles} ({decode_tiles[0].block_h} or {decode_tiles[1].block_h} heads x "
                        f"{decode_tiles[0].block_n} tokens)" if None not in decode_tiles else "")
        impls = {
            "linear_fp8": linear_fp8,
            "linear_bf16": OpImpl(f"torch F.linear ({self.blas})"),
            "rms_norm": OpImpl("triton, residual add fused; where FP8 linears read it, the 1x128 copy quantized "
                               "in the norm kernel", when=f"rows <= {c.norm.block_m}",
                               otherwise="by the quantization kernel after it"),
            "rotary": OpImpl("triton (one launch, fp32 math)"),
            "swiglu": OpImpl("triton (one launch)"),
            "mla_prefill": OpImpl(f"{mla}: paged, latents gathered through the block tables and expanded, "
                                  "torch SDPA"),
            "mla_decode": OpImpl(f"{mla}: split flash-decoding through the block tables{decode_tiles}, rope and "
                                 "the cache write in the kernel; an FP8 latent cache read and written in the "
                                 "kernel" + ("" if fp8_dtype is not None else " (unavailable here: no FP8)")),
            "moe_route": OpImpl(f"fp32 router GEMM ({self.blas}), then one triton routing kernel"),
            "moe_experts": OpImpl(f"triton grouped GEMM, {tiles} ({c.moe_decode.block_m} rows, "
                                  f"{c.moe_prefill.block_m} from {c.moe_prefill_min_rows} rows per expert): "
                                  "gate+up with SwiGLU (and FP8 quant) fused, down with weighted atomic combine"),
        }
        return {op: replace(impl, notes=self.op_notes.get(op, ())) for op, impl in impls.items()}

    def linear_fp8_gemms(self) -> str:
        """Which GEMM an FP8 linear runs at which M, read off `linear_impl` itself (so the description
        cannot drift from the dispatch), for a weight whose N is a multiple of 128 and K of 512 (every
        DeepSeek-V3 linear but kv_a's 576 rows; a ragged N keeps the split-K kernel up to decode_max_m)."""
        n = 8 * fp8.BLOCK
        extra = {"scaled_mm": (torch.empty(n, 0), None)} if self.scaled_mm is not None else {}
        if self.vendor_gemm is not None:
            extra["vendor_gemm"] = True
        weight = LinearWeight(torch.empty(0), torch.empty(0), n, SCALED_MM_K_ALIGN, extra)
        spans: list[list] = []  # [first M, last M, impl]
        for m in range(1, max(self.configs.decode_max_m, self.configs.scaled_mm_min_m) + 2):
            impl = self.linear_impl(m, weight)
            if spans and spans[-1][2] == impl:
                spans[-1][1] = m
            else:
                spans.append([m, m, impl])
        parts = [f"M {a}-{b}: {impl}" if a != b else f"M {a}: {impl}" for a, b, impl in spans[:-1]]
        return "; ".join([*parts, f"M >= {spans[-1][0]}: {spans[-1][2]}"])

    # ---- weight preparation ------------------------------------------------

    def prepare_linear(self, weight, scale_inv, precision) -> LinearWeight:
        out_features, in_features = weight.shape
        weight = weight.to(self.device)
        scale_inv = None if scale_inv is None else scale_inv.to(self.device, torch.float32)
        if precision != "fp8":
            dense = self.dense_weight(weight, scale_inv, precision)
            return LinearWeight(dense.contiguous(), None, out_features, in_features)
        w, s = self._to_fp8(weight, scale_inv)
        extra = {}
        if self.scaled_mm is not None and in_features % SCALED_MM_K_ALIGN == 0:
            padded_rows = fp8.num_blocks(out_features) * fp8.BLOCK if self.scaled_mm.pad_n else out_features
            if padded_rows != out_features:
                padded = torch.zeros(padded_rows, in_features, dtype=w.dtype, device=self.device)
                padded[:out_features] = w
                w = padded[:out_features]  # the Triton kernels read the same storage
            else:
                padded = w
            extra["scaled_mm"] = (padded, self.scaled_mm.scale_b(s))
        if self.vendor_gemm is not None and (not self.vendor_gemm.block_aligned or (
                out_features % fp8.BLOCK == 0 and in_features % fp8.BLOCK == 0)):
            extra["vendor_gemm"] = True
        return LinearWeight(w, s, out_features, in_features, extra)

    def _to_fp8(self, weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight in this chip's FP8 format with its block scales (e4m3fn converted to e4m3fnuz where
        that is the chip's format)."""
        dtype = self.capabilities.fp8_dtype
        if dtype is None:
            raise BackendError(f"precision fp8: {self.chip.arch} has no FP8 (use bf16)")
        if scale is None:
            return fp8.quantize_blocks(weight, dtype)
        if weight.dtype == torch.float8_e4m3fn and dtype == torch.float8_e4m3fnuz:
            weight, scale = fp8.fn_to_fnuz(weight, scale)
        elif weight.dtype != dtype:
            raise BackendError(f"FP8 weight of dtype {weight.dtype}: the {self.capabilities.name} backend on "
                               f"{self.chip.arch} takes float8_e4m3fn (the checkpoint's) or {dtype}")
        return weight.contiguous(), scale.contiguous()

    def prepare_experts(self, gate_up, gate_up_scale, down, down_scale, precision) -> ExpertWeights:
        parts = []
        for w, s in ((gate_up, gate_up_scale), (down, down_scale)):
            w = w.to(self.device)
            s = None if s is None else s.to(self.device, torch.float32)
            if precision == "fp8":
                parts += self._to_fp8(w, s)
            else:  # dequantized one expert at a time: a whole layer in fp32 would not fit
                parts += [self.dense_weight(w, s, precision).contiguous(), None]
        return ExpertWeights(*parts)

    def prepare_mla(self, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, dtype):
        return mla.prepare_mla(kv_b_weight.to(self.device), num_heads, qk_nope_head_dim, v_head_dim, dtype)

    # ---- GEMM --------------------------------------------------------------

    def linear(self, x, weight: LinearWeight):
        quantized, x = (x, x.values) if isinstance(x, QuantizedActivation) else (None, x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if weight.scale is None:
            y = F.linear(x2, weight.weight if weight.weight.dtype == x.dtype else weight.weight.to(x.dtype))
        else:
            m = x2.shape[0]
            # cuBLAS wants the column-major activation scales' leading dimension 16-byte aligned
            pad = -m % SCALED_MM_M_ALIGN if self._use_scaled_mm(m, weight) else 0
            if quantized is not None and not pad:
                qa, sa = quantized.q, quantized.scales
            else:
                qa, sa = self.quantize_activation(F.pad(x2, (0, 0, 0, pad)) if pad else x2)
            y = self.fp8_gemm(qa, sa, weight, x.dtype)[:m]
        return y.view(*x.shape[:-1], weight.out_features)

    def quantize_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (FP8 [M, K], float32 scales [M, K/128] column-major), per token per 128 channels."""
        caps = self.capabilities
        return quant.quantize_activation(x, caps.fp8_dtype, caps.fp8_max, self.ue8m0,
                                         self.configs.quant_tile(x.shape[0]))

    def _uses_vendor_gemm(self, m: int, weight: LinearWeight, out_dtype: torch.dtype) -> bool:
        return (m >= self.configs.scaled_mm_min_m and "vendor_gemm" in weight.extra
                and out_dtype in (torch.bfloat16, torch.float16))

    def _use_scaled_mm(self, m: int, weight: LinearWeight) -> bool:
        """torch._scaled_mm from scaled_mm_min_m rows, but the decode kernel up to decode_max_m rows where
        N is not a multiple of 128 (it wins there: 1.1-1.5x at M = 16-64 on an H100)."""
        if "scaled_mm" not in weight.extra or m < self.configs.scaled_mm_min_m:
            return False
        if self._uses_vendor_gemm(m, weight, torch.bfloat16):
            return False
        return m > self.configs.decode_max_m or weight.out_features % fp8.BLOCK == 0

    def linear_impl(self, m: int, weight: LinearWeight) -> str:
        """Which GEMM an FP8 linear with M rows runs."""
        if self._uses_vendor_gemm(m, weight, torch.bfloat16):
            return self.vendor_gemm.name
        if self._use_scaled_mm(m, weight):
            padded = weight.extra["scaled_mm"][0].shape[0] != weight.out_features
            return "torch._scaled_mm block-wise" + (" (N padded)" if padded else "")
        if m <= self.configs.decode_max_m:
            return "triton fp8 gemm (decode, split-K)"
        return "triton fp8 gemm (tiled)"

    def fp8_gemm(self, qa: torch.Tensor, sa: torch.Tensor, weight: LinearWeight,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The GEMM of an FP8 linear on already quantized activations qa [M, K], sa [M, K/128] -> [M, N]."""
        m = qa.shape[0]
        if self._uses_vendor_gemm(m, weight, out_dtype):
            return self.vendor_gemm.run(qa, sa, weight.weight, weight.scale, out_dtype)
        if self._use_scaled_mm(m, weight):
            padded, scale_b = weight.extra["scaled_mm"]
            y = torch._scaled_mm(qa, padded.t(), scale_a=sa, scale_b=scale_b, out_dtype=out_dtype)
            return y if padded.shape[0] == weight.out_features else y[:, :weight.out_features].contiguous()
        return gemm.fp8_gemm(qa, sa, weight.weight, weight.scale, out_dtype, self.configs, self.num_sms)

    # ---- small ops ---------------------------------------------------------

    def rms_norm(self, x, weight, eps, residual=None, quantize=False):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
        caps = self.capabilities
        quantize = quantize and caps.has_fp8
        # the kernel quantizes while the row is split over programs; above that, the norm and then the
        # quantization kernel are faster (H100: 6.2 against 6.6 us at 64 rows), and the copy is still handed on
        in_kernel = quantize and x2.shape[0] <= self.configs.norm.block_m  # as `implementations` says
        fused = (caps.fp8_dtype, caps.fp8_max, self.ue8m0) if in_kernel else None
        out, h, q, s = norm.rms_norm(x2, weight, eps, r2, self.configs.norm, quant=fused)
        if quantize and not in_kernel:
            q, s = self.quantize_activation(out)
        out = out.view(shape)
        return NormOutput(out, x if residual is None else h.view(shape),
                          None if q is None else QuantizedActivation(out, q, s))

    def rotary(self, x, cos, sin):
        return elementwise.rotary(x, cos, sin)

    def swiglu(self, gate, up):
        return elementwise.swiglu(gate, up)

    # ---- MLA (the kernels and their arguments: backends/triton_kernels/mla.py) -----------------

    def mla_cache_spec(self, num_blocks, block_size, kv_lora_rank, rope_dim, dtype, kv_cache_dtype="auto"):
        return mla.mla_cache_spec(num_blocks, block_size, kv_lora_rank, rope_dim, dtype, kv_cache_dtype,
                                  self.capabilities.fp8_dtype)

    def allocate_mla_cache(self, spec):
        return mla.allocate_mla_cache(spec, self.device)

    def mla_prefill(self, inputs, cache, batch, weights, softmax_scale):
        return mla.mla_prefill(inputs, cache, batch, weights, softmax_scale)

    def mla_decode(self, inputs, cache, batch, weights, softmax_scale, rope=None):
        config = self.mla_decode_config(inputs.q_nope.shape[1], mla.compute_dtype(cache, inputs))
        if batch.shared_rows:  # the keys go to the cache before the kernel: rotate them here
            q_pe, k_pe = self.rotate_for_decode(inputs.q_pe, inputs.k_pe, rope)
            inputs, rope = MLAInputs(inputs.q_nope, q_pe, inputs.latent, k_pe), None
        return mla.mla_decode(inputs, cache, batch, weights, softmax_scale, config=config, rope=rope)

    def mla_decode_config(self, num_heads: int, cache_dtype: torch.dtype):
        """The decode kernel's tiles on this chip (its platform's table)."""
        return self.platform.mla_decode_config(self.chip.arch, num_heads, cache_dtype, self.native)

    # ---- MoE ---------------------------------------------------------------

    def moe_route(self, x, gate_weight, bias, config):
        return routing.route(F.linear(x.float(), gate_weight.float()), bias, config)

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        quant_args = (self.capabilities.fp8_max, self.ue8m0) if experts.is_fp8 else None
        quantized = (x.q, x.scales) if isinstance(x, QuantizedActivation) and experts.is_fp8 else None
        return moe.moe_experts(plain(x), weights, ids, experts.gate_up, experts.gate_up_scale, experts.down,
                               experts.down_scale, self.configs, quant=quant_args, quantized=quantized)

    # ---- graphs ------------------------------------------------------------

    def graph_runner(self, step):
        """Capture `step` in a CUDA (HIP) graph and return its replay; None off a cuda device, under
        TRITON_INTERPRET=1 and where capture fails.

        Two warm-up runs on a side stream first compile the kernels and make the tensors an op
        caches on first use (outside the graph's memory). The graphs of this backend allocate from
        one memory pool while any of them lives (they run one at a time, and their inputs and outputs
        live outside it); once all are gone, the next capture starts a new pool.
        """
        if self.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        with torch.cuda.device(self.device):
            if self._graph_stream is None:
                self._graph_stream = torch.cuda.Stream(self.device)
            if not self._graphs:  # a pool whose graphs are all gone cannot be reopened (torch asserts)
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._graph_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._graph_stream):
                for _ in range(GRAPH_WARMUP_RUNS):
                    step()
            torch.cuda.current_stream().wait_stream(self._graph_stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    step()
            except RuntimeError as e:  # a host synchronisation inside step: run it eagerly
                torch.cuda.synchronize(self.device)
                warnings.warn(f"{self.capabilities.name} backend: a step could not be captured in a graph; it "
                              f"runs eagerly ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                              stacklevel=2)
                return None
        self._graphs.add(graph)
        return graph.replay
