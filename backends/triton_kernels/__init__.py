"""Triton kernels shared by the CUDA and ROCm backends.

Nothing here assumes a vendor: block sizes and launch settings come from a
per-arch table (configs.py) passed in by the backend, and the FP8 dtype of each
kernel follows its input tensors (e4m3fn is tl.float8e4nv, e4m3fnuz is
tl.float8e4b8). Modules: quant (activation quantization 1x128, fused with
RMSNorm), gemm (FP8 block-scaled GEMM), moe (grouped MoE), mla (latent attention).
Import this package only from a backend: it imports triton.
"""
