"""The conformance cases' inputs (Context, seeded generators, shared checkpoint-style weights, rope
tables, the tiny checkpoint) and the cases of the linears, rms_norm, rotary, swiglu and the model.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from dsv3.backends import fp8
from dsv3.backends.interface import Backend
from dsv3.backends.reference import ReferenceBackend
from dsv3.config import load_config
from dsv3.conformance.suite import LITE_HEADS, MODEL, ROPE, V3_HEADS, Case, Greedy, Plan
from dsv3.model import ACTIVATION_DTYPES, rope_tables


class Context:
    """Inputs shared by several cases (checkpoint weights, rope tables, the tiny checkpoint), built once."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._memo: dict[Any, Any] = {}

    def memo(self, key, build: Callable[[], Any]):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g) * scale


# ---- shared inputs -------------------------------------------------------------------------

def fp8_weight(ctx: Context, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint-style e4m3fn weight [n, k] with 128x128 block scales (values ~ N(0, 1/k))."""
    weight, scale = ctx.memo(("fp8", n, k),
                             lambda: fp8.quantize_blocks(randn(generator(f"w{n}x{k}"), n, k, scale=k ** -0.5)))
    return weight.clone(), scale.clone()  # a backend that converts in place must not change the next case


def expert_weights(ctx: Context, num_experts: int, hidden: int, inter: int, fp8_checkpoint: bool) -> dict:
    """Stacked experts as the loader gives them: gate_up [E, 2I, D], down [E, D, I] (+ scales if FP8)."""
    def build():
        g = generator(f"experts{num_experts}x{hidden}x{inter}")
        gate_up, down = randn(g, num_experts, 2 * inter, hidden, scale=hidden ** -0.5), \
            randn(g, num_experts, hidden, inter, scale=inter ** -0.5)
        if not fp8_checkpoint:
            return dict(gate_up=gate_up.bfloat16(), gate_up_scale=None, down=down.bfloat16(), down_scale=None)
        (gu, gus), (d, ds) = fp8.quantize_blocks(gate_up), fp8.quantize_blocks(down)
        return dict(gate_up=gu, gate_up_scale=gus, down=d, down_scale=ds)
    stored = ctx.memo(("experts", num_experts, hidden, inter, fp8_checkpoint), build)
    return {name: None if t is None else t.clone() for name, t in stored.items()}


def v3_rope(ctx: Context, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's YaRN cos/sin at positions [B, T] -> [B, T, 32] each."""
    config = ctx.memo("v3", lambda: load_config("deepseek-v3"))
    cos, sin = ctx.memo("rope", lambda: rope_tables(config, config.max_position_embeddings, torch.device("cpu")))
    return cos[positions], sin[positions]


def v3_softmax_scale(ctx: Context) -> float:
    return ctx.memo("v3", lambda: load_config("deepseek-v3")).softmax_scale()


def tiny_checkpoint(ctx: Context) -> Path:
    """The built-in tiny checkpoint, or one written from synthetic FP8 weights of the tiny config."""
    from dsv3.api import TINY_CHECKPOINT
    if (TINY_CHECKPOINT / "config.json").exists():
        return TINY_CHECKPOINT

    def build():
        from dsv3.checkpoint import RandomSource, save_checkpoint
        config = load_config("tiny")
        source = RandomSource(config, fp8=True, seed=0)
        tensors = {name: source.get(name) for name in sorted(source.names())}
        return save_checkpoint(ctx.workdir / "tiny", tensors, config.to_dict())
    return ctx.memo("tiny", build)


def poison(x: torch.Tensor, row_index: tuple[int, ...], value: float, column: int = 0) -> None:
    x[row_index + (column,)] = value


def zero_row(inp: dict) -> None:
    """Row 1 of the input all zero: its output must come out exactly zero."""
    inp["x"][1] = 0


def times_1e4(inp: dict) -> None:
    """The input x1e4: beyond FP8's range, and far from bf16's rounding of typical values."""
    inp["x"] *= 1e4


# ---- op cases ------------------------------------------------------------------------------

def _linear(precision: str):
    def call(backend: Backend, inp: dict):
        weight = backend.prepare_linear(inp["weight"], inp["scale"], precision)
        return backend.linear(inp["x"], weight)
    return call


def _normed_linear(backend: Backend, inp: dict):
    """RMSNorm asked for its FP8 copy, then the FP8 linear on what it returned (the model's hand-off)."""
    weight = backend.prepare_linear(inp["weight"], inp["scale"], "fp8")
    gamma = torch.linspace(0.5, 1.5, inp["x"].shape[-1], dtype=inp["x"].dtype, device=inp["x"].device)
    return backend.linear(backend.rms_norm(inp["x"], gamma, 1e-6, quantize=True).activation, weight)


def linear_cases(plan: Plan, precision: str) -> list[Case]:
    op = "linear_fp8" if precision == "fp8" else "linear_bf16"
    dtype = ACTIVATION_DTYPES[precision]
    call = _linear(precision)

    def case(name, n, k, lead, transform=None, check="close", dense_weight=False):
        def inputs(ctx):
            g = generator(f"{op}{precision}{name}")
            if dense_weight:
                weight, scale = randn(g, n, k, scale=k ** -0.5).bfloat16(), None
            else:
                weight, scale = fp8_weight(ctx, n, k)
            inp = dict(x=randn(g, *lead, k), weight=weight, scale=scale)
            if transform:
                transform(inp, g)
            inp["x"] = inp["x"].to(dtype)
            return inp
        return Case(op, precision, name, inputs, call, check)

    def zero_block(inp, g):  # row 0: first 128-block zero; row 1: all zero (output must be exactly 0)
        inp["x"][0, :128] = 0
        inp["x"][1] = 0

    def non_finite(inp, g):
        poison(inp["x"], (1,), float("nan"), 300)
        poison(inp["x"], (2,), float("inf"), 5)
        inp["poisoned"] = torch.tensor([False, True, True, False])

    def mixed_blocks(inp, g):  # K block 0 huge, but its weight columns zero: a per-tensor scale loses the rest
        inp["x"][:, :128] *= 1e4
        w = fp8.dequantize_blocks(inp["weight"], inp["scale"], torch.float32)
        w[:, :128] = 0
        inp["weight"], inp["scale"] = fp8.quantize_blocks(w)

    def beyond_range(inp, g):
        inp["x"] *= 1e4

    def huge_dense_weight(inp, g):  # a BF16 weight with values far beyond FP8's 448, quantized at load
        inp["weight"] = (inp["weight"].float() * 3e4).bfloat16()

    cases = [case(f"{n}x{k} M={m}", n, k, (m,)) for n, k in plan.linear_shapes for m in plan.token_counts]
    first_n, first_k = plan.linear_shapes[0]
    cases += [
        case("unaligned 576x7168 (kv_a) M=3", 576, 7168, (3,)),
        case(f"input [2, 3, {first_k}] -> {first_n}", first_n, first_k, (2, 3)),
        case(f"large batch {first_n}x{first_k} M={plan.large_tokens}", first_n, first_k, (plan.large_tokens,)),
        case("zero 128-block and zero row, 576x7168", 576, 7168, (4,), zero_block),
        case("NaN and inf rows, 576x7168", 576, 7168, (4,), non_finite, "propagate"),
    ]
    if precision == "fp8":
        cases += [
            dataclasses.replace(case("after RMSNorm, from its FP8 copy, 2112x7168 M=16", 2112, 7168, (16,)),
                                call=_normed_linear),
            case("activations beyond FP8 range (x1e4), 576x7168", 576, 7168, (4,), beyond_range),
            case("mixed block magnitudes (1e4 and 1), 576x7168", 576, 7168, (4,), mixed_blocks),
            case("BF16 weight quantized at load, 576x7168", 576, 7168, (4,), None, dense_weight=True),
            case("BF16 weight beyond FP8 range (3e4), 576x7168", 576, 7168, (4,), huge_dense_weight,
                 dense_weight=True),
        ]
    else:
        cases.append(case("BF16 checkpoint weight, 576x7168", 576, 7168, (4,), None, dense_weight=True))
    return cases


def _rms_norm(backend: Backend, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized values and the residual stream (x + residual, or x), both checked."""
    out = backend.rms_norm(inp["x"], inp["weight"], 1e-6, inp["residual"])
    return out.values, out.residual


def rms_norm_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, rows, dim, residual=False, transform=None, check="close"):
        def inputs(ctx):
            g = generator(f"rms{precision}{name}")
            inp = dict(x=randn(g, rows, dim), weight=(1 + randn(g, dim, scale=0.1)).to(dtype),
                       residual=randn(g, rows, dim) if residual else None)
            if transform:
                transform(inp)
            inp["x"] = inp["x"].to(dtype)
            if residual:
                inp["residual"] = inp["residual"].to(dtype)
            return inp
        return Case("rms_norm", precision, name, inputs, _rms_norm, check)

    def non_finite(inp):
        poison(inp["x"], (1,), float("nan"))
        poison(inp["x"], (2,), float("inf"), 7)
        inp["poisoned"] = torch.tensor([False, True, True, False])

    cases = [case(f"D={d} M={m}", m, d) for d in (7168, 1536, 512) for m in plan.token_counts]
    cases += [
        case("residual D=7168 M=16", 16, 7168, residual=True),
        case("residual D=7168 M=1", 1, 7168, residual=True),
        case(f"large batch D=7168 M={plan.large_tokens}", plan.large_tokens, 7168),
        case("zero row D=7168", 4, 7168, transform=zero_row),
        case("values 1e4 D=7168", 4, 7168, transform=times_1e4),
        case("NaN and inf rows D=7168", 4, 7168, transform=non_finite, check="propagate"),
        case("NaN and inf rows, residual D=512", 4, 512, residual=True, transform=non_finite, check="propagate"),
    ]
    return cases


def rotary_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, shape, positions, check="close", poisoned_row=None):
        def inputs(ctx):
            g = generator(f"rotary{precision}{name}")
            pos = positions(g)
            cos, sin = v3_rope(ctx, pos)
            x = randn(g, *shape)
            inp = dict(x=x, cos=cos, sin=sin)
            if poisoned_row is not None:
                poison(x, poisoned_row, float("nan"), 1)
                poison(x, (shape[0] - 1,) + (0,) * (len(shape) - 2), float("inf"), 2)
                mask = torch.zeros(shape[:-1], dtype=torch.bool)
                mask[poisoned_row] = mask[(shape[0] - 1,) + (0,) * (len(shape) - 2)] = True
                inp["poisoned"] = mask
            inp["x"] = x.to(dtype)
            return inp
        return Case("rotary", precision, name, inputs,
                    lambda backend, inp: backend.rotary(inp["x"], inp["cos"], inp["sin"]), check)

    def span(b, t, start=0):
        return lambda g: (start + torch.arange(t)).expand(b, t)

    def scattered(b, high):
        return lambda g: torch.randint(0, high, (b, 1), generator=g)

    long = plan.long_seq
    return [
        case("q_pe [1, 16, 128, 64]", (1, 16, V3_HEADS, ROPE), span(1, 16)),
        case("k_pe [2, 16, 64]", (2, 16, ROPE), span(2, 16)),
        case("length 1 [1, 1, 128, 64]", (1, 1, V3_HEADS, ROPE), span(1, 1)),
        case("decode [32, 1, 128, 64] positions < 4096", (32, 1, V3_HEADS, ROPE), scattered(32, 4096)),
        case(f"long [1, {long}, 16, 64]", (1, long, LITE_HEADS, ROPE), span(1, long)),
        case("YaRN-extended positions 163800+", (2, 8, V3_HEADS, ROPE), span(2, 8, 163800)),
        case("NaN and inf rows", (2, 4, V3_HEADS, ROPE), span(2, 4), "propagate", (0, 1, 3)),
    ]


def swiglu_cases(plan: Plan, precision: str) -> list[Case]:
    dtype = ACTIVATION_DTYPES[precision]

    def case(name, rows, inter, check="close", poisoned=()):
        def inputs(ctx):
            g = generator(f"swiglu{precision}{name}")
            fused = randn(g, rows, 2 * inter, scale=4.0)  # a gate+up GEMM's output; the op gets its halves
            for row in poisoned:
                fused[row, 1] = float("nan") if row % 2 == 0 else float("inf")
            fused = fused.to(dtype)
            inp = dict(gate=fused[:, :inter], up=fused[:, inter:])
            if poisoned:
                inp["poisoned"] = torch.zeros(rows, dtype=torch.bool)
                inp["poisoned"][list(poisoned)] = True
            return inp
        return Case("swiglu", precision, name, inputs, lambda backend, inp: backend.swiglu(inp["gate"], inp["up"]),
                    check)

    return [
        case("dense MLP, 1 token, I=18432", 1, 18432),
        case("expert I=2048, 64 tokens", 64, 2048),
        case("unaligned I=1000, 7 tokens", 7, 1000),
        case("NaN and inf rows", 4, 2048, "propagate", (0, 3)),
    ]


#: the model cases' cache: two sequences of max_seq_len 64, sized explicitly because the suite shares
#: the device with everything it has built, which memory-based sizing would count as taken
CASE_CACHE_TOKENS = 2 * 64


def model_cases(precision: str) -> list[Case]:
    def inputs(ctx):
        path = tiny_checkpoint(ctx)
        g = generator("model")
        vocab = load_config(path).vocab_size
        tokens = torch.randint(2, vocab, (2, 12), generator=g)
        inp = dict(path=path, tokens=tokens, prompts=[tokens[0].tolist(), tokens[1, :5].tolist()])
        if precision != "fp32":  # the exact answer, to tell a precision's own rounding noise from a wrong result
            from dsv3.api import load_model
            inp["exact"] = load_model(path, backend=ReferenceBackend(), precision="fp32", max_batch_size=2,
                                      max_seq_len=64, cache_tokens=CASE_CACHE_TOKENS, progress=False,
                                      quiet=True).logits(tokens)
        return inp

    def load(backend, inp):
        from dsv3.api import load_model
        return load_model(inp["path"], backend=backend, precision=precision, max_batch_size=2, max_seq_len=64,
                          cache_tokens=CASE_CACHE_TOKENS, progress=False, quiet=True)

    def logits(backend, inp):
        return load(backend, inp).logits(inp["tokens"])

    def greedy(backend, inp):
        model = load(backend, inp)
        return Greedy(inp["prompts"], model.greedy_tokens(inp["prompts"], 8), model)

    return [Case(MODEL, precision, "tiny checkpoint: logits [2, 12]", inputs, logits,
                 "close" if precision == "fp32" else "logits"),
            Case(MODEL, precision, "tiny checkpoint: greedy 8 tokens, prompts of 12 and 5", inputs, greedy, "greedy")]
