"""Backends that are wrong on purpose, or cannot be built, for the tests of `dsv3 conformance`.

Each differs from the reference backend in one known way, so a test can say which rows must fail
and why. They are registered in backends.registry only inside tests (monkeypatch).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from dsv3.backends import fp8
from dsv3.backends.interface import NormOutput
from dsv3.backends.reference import ReferenceBackend


class WrongRmsNormBackend(ReferenceBackend):
    """Normalizes by the mean |x| instead of the root mean square."""

    def rms_norm(self, x, weight, eps, residual=None, quantize=False):
        if residual is not None:
            x = x + residual
        xf = x.float()
        return NormOutput(weight.to(x.dtype) * (xf / (xf.abs().mean(-1, keepdim=True) + eps)).to(x.dtype), x)


class DoubledScaleBackend(ReferenceBackend):
    """Keeps every FP8 linear's weight scales twice too large (an fn -> fnuz conversion applied twice)."""

    def prepare_linear(self, weight, scale_inv, precision):
        prepared = super().prepare_linear(weight, scale_inv, precision)
        if prepared.scale is not None:
            prepared.scale = prepared.scale * 2
        return prepared


class NoScaleFloorBackend(ReferenceBackend):
    """Quantizes activations without the 1e-4 scale floor, so an all-zero 128-block gives 0/0 = NaN
    (the bug DeepSeek's own kernel had until 2025-08); otherwise the reference's numbers."""

    def _fp8_matmul(self, x, weight, scale):
        k = x.shape[-1]
        blocks = F.pad(x.float(), (0, -k % fp8.BLOCK)).unflatten(-1, (-1, fp8.BLOCK))
        step = blocks.abs().amax(-1, keepdim=True) / self.capabilities.fp8_max
        dequantized = ((blocks / step).to(self.capabilities.fp8_dtype).float() * step).flatten(-2)[..., :k]
        return dequantized @ fp8.dequantize_blocks(weight, scale, torch.float32).T


class NanSwallowingBackend(ReferenceBackend):
    """Replaces NaN/inf in rms_norm's input by 0, hiding corrupt activations."""

    def rms_norm(self, x, weight, eps, residual=None, quantize=False):
        return super().rms_norm(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), weight, eps, residual)


class LeakyExpertsBackend(ReferenceBackend):
    """Mixes a batch-wide sum into every token, so one NaN token poisons the whole batch."""

    def moe_experts(self, x, weights, ids, experts):
        out = super().moe_experts(x, weights, ids, experts)
        return out + 0 * out.sum(0, keepdim=True)


class UnskippedExpertsBackend(ReferenceBackend):
    """Runs a pair marked -1 on expert 0 with its weight instead of skipping it."""

    def moe_experts(self, x, weights, ids, experts):
        return super().moe_experts(x, weights, ids.clamp(min=0), experts)


class NoBiasRoutingBackend(ReferenceBackend):
    """Ignores the correction bias when choosing experts (DeepSeek-V3's noaux_tc needs it)."""

    def moe_route(self, x, gate_weight, bias, config):
        return super().moe_route(x, gate_weight, None, config)


class ShuffledRoutingBackend(ReferenceBackend):
    """The reference's routing with each token's experts in reverse order (order carries no meaning)."""

    def moe_route(self, x, gate_weight, bias, config):
        weights, ids = super().moe_route(x, gate_weight, bias, config)
        return weights.flip(-1), ids.flip(-1)


class CrashingRotaryBackend(ReferenceBackend):
    """rotary raises, as a kernel that does not compile would."""

    def rotary(self, x, cos, sin):
        raise RuntimeError("rotary kernel failed to compile (test double)")


class NoFp8Backend(ReferenceBackend):
    """A chip without FP8 and without an mla_decode implementation."""

    def __init__(self, device="cpu", chip=None):
        super().__init__(device)
        ops = {k: v for k, v in self.capabilities.ops.items() if k not in ("linear_fp8", "mla_decode")}
        self.capabilities = dataclasses.replace(self.capabilities, name="nofp8", fp8_dtype=None, fp8_max=None, ops=ops)


class EmulatedBackend(ReferenceBackend):
    """The reference's numbers, declared as an emulation of some vendor's ops."""

    emulation = "test double: plain torch standing in for vendor ops"


class UnbuildableBackend(ReferenceBackend):
    """Cannot be built here, like a vendor backend whose packages are missing."""

    def __init__(self, device=None, chip=None):
        raise ImportError("No module named 'torch_npu' (test double)")
