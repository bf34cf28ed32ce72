"""The CUDA backend: NVIDIA GPUs, FP8 on sm_89/sm_90 and newer, BF16 on sm_80.

Which implementation runs for each op (Capabilities.ops says it in words):
- FP8 linear: activations quantized 1x128 by a Triton kernel; then for M <= 64
  the split-K Triton GEMM (bound by reading the weight once), and for larger M
  torch._scaled_mm block-wise (cuBLAS) where this torch and chip have it and it
  computes the right thing (checked once at start), else the tiled Triton GEMM.
  Where _scaled_mm cannot take M = 1, and where N is not a multiple of 128 up to
  M = 64, the split-K kernel runs (it is the faster one there).
  _scaled_mm needs K to be a multiple of 512 (its weight-scale layout), else the
  Triton kernels run; where it also wants N to be a multiple of 128 (checked at
  start; torch 2.11 does not), such weights keep a zero-padded copy (576 -> 640
  rows) and the extra columns are dropped.
- BF16/FP32 linear: F.linear (cuBLAS).
- RMSNorm (with the residual add fused), rotary, SwiGLU and routing (after the fp32
  router GEMM) in Triton.
- MLA: backends/triton_kernels/mla.py; where that module is absent, the
  reference backend's torch code.
- Routed experts: the grouped Triton MoE of backends/triton_kernels/moe.py.
Every op of a decode step avoids host synchronisation, so a step can be
captured in a CUDA graph (except the reference MLA fallback); `graph_runner`
records such a step (decode, per batch bucket) in a CUDA graph.
"""

from __future__ import annotations

import importlib
import os
import warnings
import weakref

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.chips import ChipInfo, describe_chip
from dsv3.backends.interface import (
    Backend,
    CacheSpec,
    Capabilities,
    ExpertWeights,
    LinearWeight,
    MLAWeights,
    Precision,
    QuantizedActivation,
    RoutingConfig,
    plain,
)
from dsv3.backends.reference import ReferenceBackend
from dsv3.backends.triton_kernels import elementwise, gemm, moe, quant, routing
from dsv3.backends.triton_kernels.configs import kernel_configs

_DENSE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_MLA_MODULE = "dsv3.backends.triton_kernels.mla"
#: cuBLAS's 128x128 weight scales are [round_up(K/128, 4), N/128] with strides (1, that): the plain
#: transposed scale tensor has this layout when K/128 is a multiple of 4 (every DeepSeek-V3 K is).
SCALED_MM_K_ALIGN = 4 * fp8.BLOCK
#: rows of the activations given to torch._scaled_mm come in multiples of this (16 bytes of fp32 scales)
SCALED_MM_M_ALIGN = 4
GRAPH_WARMUP_RUNS = 2


def probe_chip(device: torch.device) -> ChipInfo:
    """Describe the NVIDIA GPU at `device` from its compute capability (sm_XY)."""
    if not torch.cuda.is_available():
        raise ValueError("the cuda backend needs an NVIDIA GPU, and torch.cuda.is_available() is False")
    if torch.version.hip is not None:
        raise ValueError("the cuda backend runs on NVIDIA GPUs; this torch is built for ROCm (use the rocm backend)")
    major, minor = torch.cuda.get_device_capability(device)
    props = torch.cuda.get_device_properties(device)
    return describe_chip("nvidia", f"sm_{major}{minor}", name=props.name, memory_bytes=props.total_memory,
                         count=torch.cuda.device_count())


def _scaled_mm_matches(device: torch.device, n: int, layout: str) -> bool:
    """Whether torch._scaled_mm block-wise, with the weight scales passed as `layout`, computes the
    block math on a [32, 512] x [n, 512] product with uneven scales."""
    g = torch.Generator(device).manual_seed(0)
    m, k = 32, 512
    a = (torch.randn(m, k, device=device, generator=g) * 8).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, device=device, generator=g) * 8).to(torch.float8_e4m3fn)
    sa = quant.empty_scales(m, k, device)
    sa.copy_(torch.rand(m, k // 128, device=device, generator=g) + 0.5)
    sw = torch.rand(fp8.num_blocks(n), k // 128, device=device, generator=g) + 0.5
    expected = (a.float() * sa.repeat_interleave(128, 1)) @ (w.float() * fp8.expand_block_scales(sw, n, k)).T
    scale_b = sw.t() if layout == "view" else sw.t().contiguous()
    try:
        got = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=scale_b, out_dtype=torch.bfloat16).float()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return torch.allclose(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def _load_mla():
    """The MLA kernel module, or None while it does not exist."""
    try:
        return importlib.import_module(_MLA_MODULE)
    except ModuleNotFoundError as e:
        if e.name != _MLA_MODULE:
            raise
        return None


class CudaBackend(Backend):
    """Backend for NVIDIA GPUs.

    Args:
        device: a CUDA device ("cuda", "cuda:1"); "cuda" by default.
        chip: the GPU's description; probed from the device when None (must be NVIDIA).
        ue8m0: round activation scales up to powers of two (DeepSeek-V3.1's scale_fmt).
    """

    def __init__(self, device: str | None = None, chip: ChipInfo | None = None, ue8m0: bool = False):
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise ValueError(f"the cuda backend needs a cuda device, got {device}")
        chip = chip or probe_chip(device)
        if chip.vendor != "nvidia":
            raise ValueError(f"the cuda backend runs on NVIDIA GPUs, got a {chip.vendor} {chip.arch}")
        self.chip, self.ue8m0 = chip, ue8m0
        self.configs = kernel_configs(chip.arch)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if torch.cuda.is_available() else 132)
        fp8_dtype = torch.float8_e4m3fn if chip.fp8_format == "e4m3fn" else None
        self._reference = ReferenceBackend(device)
        self._scaled_mm_scale_b, self._scaled_mm_pad_n = (self._probe_scaled_mm(device) if fp8_dtype is not None
                                                          else (None, False))
        self._mla = _load_mla()
        self._graph_pool = self._graph_stream = None  # made on the first graph_runner call
        self._graphs = weakref.WeakSet()  # the live graphs recorded in _graph_pool
        if self._scaled_mm_scale_b:
            first_large, large_m = self.configs.scaled_mm_min_m, "torch._scaled_mm block-wise (cuBLAS)"
        else:
            first_large, large_m = self.configs.decode_max_m + 1, "triton fp8 gemm (tiled)"
        mla = "triton (backends/triton_kernels/mla.py)" if self._mla else "reference fallback (torch)"
        self.capabilities = Capabilities(
            name="cuda",
            device=str(device),
            fp8_dtype=fp8_dtype,
            fp8_max=chip.fp8_max if fp8_dtype is not None else None,
            dist_backend="nccl",
            native_fp8=fp8_dtype is not None,
            ops={
                "linear_fp8": (f"triton 1x128 quant, then triton fp8 gemm (decode, split-K) for M < {first_large}, "
                               f"{large_m} from there") if fp8_dtype else
                              f"unavailable on {chip.arch}: BF16 fallback",
                "linear_bf16": "torch F.linear (cuBLAS)",
                "rms_norm": "triton (residual add fused; the 1x128 quantization too where FP8 linears read it)",
                "rotary": "triton (one launch, fp32 math)",
                "swiglu": "triton (one launch)",
                "mla_prefill": mla,
                "mla_decode": f"{mla}; rope and the cache write in the attention kernel" if self._mla else mla,
                "moe_route": "fp32 router GEMM (cuBLAS), then one triton routing kernel",
                "moe_experts": "triton grouped GEMM: gate+up with SwiGLU (and FP8 quant) fused, down with "
                               "weighted atomic combine",
            },
        )

    # ---- start-up checks ---------------------------------------------------

    def _probe_scaled_mm(self, device: torch.device) -> tuple[str | None, bool]:
        """How torch._scaled_mm takes 128x128 weight scales here, checked once on small products.

        Returns:
            (layout, pad): layout "view" or "contiguous" of the transposed weight scales whose
            result matches the block math (None where none does, or no _scaled_mm); pad: N must
            be padded to a multiple of 128 (an unaligned N failed or came out wrong).
        """
        if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
            return None, False
        layout = next((name for name in ("view", "contiguous") if _scaled_mm_matches(device, 256, name)), None)
        return layout, layout is not None and not _scaled_mm_matches(device, 320, layout)

    # ---- weight preparation ------------------------------------------------

    def prepare_linear(self, weight, scale_inv, precision: Precision) -> LinearWeight:
        out_features, in_features = weight.shape
        weight = weight.to(self.device)
        scale_inv = None if scale_inv is None else scale_inv.to(self.device, torch.float32)
        if precision != "fp8":
            dense = (fp8.dequantize_blocks(weight, scale_inv, _DENSE_DTYPES[precision]) if scale_inv is not None
                     else weight.to(_DENSE_DTYPES[precision]))
            return LinearWeight(dense.contiguous(), None, out_features, in_features)
        w, s = self._to_fp8(weight, scale_inv)
        extra = {}
        if self._scaled_mm_scale_b and in_features % SCALED_MM_K_ALIGN == 0:
            padded_rows = fp8.num_blocks(out_features) * fp8.BLOCK if self._scaled_mm_pad_n else out_features
            if padded_rows != out_features:
                padded = torch.zeros(padded_rows, in_features, dtype=w.dtype, device=self.device)
                padded[:out_features] = w
                w = padded[:out_features]  # the Triton kernels read the same storage
            else:
                padded = w
            scale_b = s.t() if self._scaled_mm_scale_b == "view" else s.t().contiguous()
            extra["scaled_mm"] = (padded, scale_b)
        return LinearWeight(w, s, out_features, in_features, extra)

    def _to_fp8(self, weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capabilities.fp8_dtype is None:
            raise ValueError(f"precision fp8: {self.chip.arch} has no FP8 (use bf16)")
        if scale is None:
            return fp8.quantize_blocks(weight, self.capabilities.fp8_dtype)
        return weight.contiguous(), scale.contiguous()

    def prepare_experts(self, gate_up, gate_up_scale, down, down_scale, precision: Precision) -> ExpertWeights:
        parts = []
        for w, s in ((gate_up, gate_up_scale), (down, down_scale)):
            w = w.to(self.device)
            s = None if s is None else s.to(self.device, torch.float32)
            if precision == "fp8":
                parts += self._to_fp8(w, s)
            elif s is not None:  # one expert at a time: a whole layer in fp32 would not fit
                dense = torch.empty(w.shape, dtype=_DENSE_DTYPES[precision], device=self.device)
                for e in range(w.shape[0]):
                    dense[e] = fp8.dequantize_blocks(w[e], s[e], dense.dtype)
                parts += [dense, None]
            else:
                parts += [w.to(_DENSE_DTYPES[precision]).contiguous(), None]
        return ExpertWeights(*parts)

    def prepare_mla(self, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, dtype) -> MLAWeights:
        if self._mla is not None and hasattr(self._mla, "prepare_mla"):
            return self._mla.prepare_mla(kv_b_weight.to(self.device), num_heads, qk_nope_head_dim, v_head_dim, dtype)
        return self._reference.prepare_mla(kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, dtype)

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

    def _use_scaled_mm(self, m: int, weight: LinearWeight) -> bool:
        """torch._scaled_mm from scaled_mm_min_m rows, but the decode kernel up to decode_max_m rows where
        N is not a multiple of 128 (it wins there: 1.1-1.5x at M = 16-64 on an H100)."""
        if "scaled_mm" not in weight.extra or m < self.configs.scaled_mm_min_m:
            return False
        return m > self.configs.decode_max_m or weight.out_features % fp8.BLOCK == 0

    def linear_impl(self, m: int, weight: LinearWeight) -> str:
        """Which GEMM an FP8 linear with M rows runs."""
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
        in_kernel = quantize and x2.shape[0] <= self.configs.norm.block_m
        fused = (caps.fp8_dtype, caps.fp8_max, self.ue8m0) if in_kernel else None
        out, h, q, s = quant.rms_norm(x2, weight, eps, r2, self.configs.norm, quant=fused)
        if quantize and not in_kernel:
            q, s = self.quantize_activation(out)
        out = out.view(shape) if q is None else QuantizedActivation(out.view(shape), q, s)
        return (out, h.view(shape)) if residual is not None else out

    def rotary(self, x, cos, sin):
        return elementwise.rotary(x, cos, sin)

    def swiglu(self, gate, up):
        return elementwise.swiglu(gate, up)

    # ---- MLA ---------------------------------------------------------------

    def mla_cache_spec(self, max_batch_size, max_seq_len, kv_lora_rank, rope_dim, dtype) -> CacheSpec:
        source = self._mla or self._reference
        return source.mla_cache_spec(max_batch_size, max_seq_len, kv_lora_rank, rope_dim, dtype)

    def allocate_mla_cache(self, spec: CacheSpec) -> torch.Tensor:
        if self._mla is not None:
            return self._mla.allocate_mla_cache(spec, self.device)
        return self._reference.allocate_mla_cache(spec)

    def mla_prefill(self, q_nope, q_pe, latent, k_pe, cache, slots, start_pos, weights, softmax_scale):
        source = self._mla or self._reference
        return source.mla_prefill(q_nope, q_pe, latent, k_pe, cache, slots, start_pos, weights, softmax_scale)

    def mla_decode(self, q_nope, q_pe, latent, k_pe, cache, slots, positions, weights, softmax_scale, rope=None):
        if self._mla is None:
            q_pe, k_pe = self.rotate_for_decode(q_pe, k_pe, rope)
            return self._reference.mla_decode(q_nope, q_pe, latent, k_pe, cache, slots, positions, weights,
                                              softmax_scale)
        return self._mla.mla_decode(q_nope, q_pe, latent, k_pe, cache, slots, positions, weights, softmax_scale,
                                    rope=rope)

    # ---- MoE ---------------------------------------------------------------

    def moe_route(self, x, gate_weight, bias, config: RoutingConfig):
        return routing.route(F.linear(x.float(), gate_weight.float()), bias, config)

    def moe_experts(self, x, weights, ids, experts: ExpertWeights):
        quant_args = (self.capabilities.fp8_max, self.ue8m0) if experts.is_fp8 else None
        quantized = (x.q, x.scales) if isinstance(x, QuantizedActivation) and experts.is_fp8 else None
        return moe.moe_experts(plain(x), weights, ids, experts.gate_up, experts.gate_up_scale, experts.down,
                               experts.down_scale, self.configs, quant=quant_args, quantized=quantized)

    # ---- graphs ------------------------------------------------------------

    def graph_runner(self, step):
        """Capture `step` in a CUDA graph and return its replay; None without the Triton MLA (its reference
        fallback synchronises the host), off a CUDA device or under TRITON_INTERPRET=1 (a subclass emulated
        on the CPU), and where capture fails.

        Two warm-up runs on a side stream first compile the kernels and make the tensors an op
        caches on first use (outside the graph's memory). The graphs of this backend allocate from
        one memory pool while any of them lives (they run one at a time, and their inputs and outputs
        live outside it); once all are gone, the next capture starts a new pool.
        """
        if self._mla is None or self.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
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
                warnings.warn(f"cuda backend: a step could not be captured in a CUDA graph; it runs eagerly "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=2)
                return None
        self._graphs.add(graph)
        return graph.replay
