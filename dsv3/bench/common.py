"""Timing, roofline and result records shared by the `dsv3 bench` subcommands.

How an op is timed (`time_op`): a few warm-up calls, then the op over several
input sets in rotation (so that no set stays in the L2 cache between calls),
timed with device events, the median taken. On a CUDA device the calls are
first captured in a CUDA graph and the graph's replays are timed, so launch
gaps do not count; an op that cannot be captured is timed eagerly, and the
record says which.

The roofline is measured in the same run (`measure_roofline`): device copy
bandwidth counting bytes read plus written, the BF16 matmul rate at 8192^3 and
the FP8 torch._scaled_mm rates at 8192^3 (tensor-wise and block-wise 1x128 x
128x128).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

BLOCK = 128
ROTATION_BYTES = 256 << 20  # rotate input sets until they span this many bytes (several L2s)
MAX_ROTATION = 64


# ---- timing -----------------------------------------------------------------

def rotation_count(bytes_per_set: int, budget: int = ROTATION_BYTES, limit: int = MAX_ROTATION) -> int:
    """How many distinct input sets to rotate through so that together they exceed the caches."""
    return max(1, min(limit, math.ceil(budget / max(bytes_per_set, 1))))


class _Clock:
    """Device events on an accelerator, a host clock after a synchronize on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events = device.type != "cpu"

    def sync(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def mark(self):
        if self.events:
            event = torch.Event(device=self.device, enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.events:
            return start.elapsed_time(end)
        return (end - start) * 1e3


def _capture(fn: Callable, inputs: Sequence[tuple]):
    """A CUDA graph running fn once per input set, or None where capture is impossible."""
    if not torch.cuda.is_available() or inputs and not _on_cuda(inputs[0]):
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs[0])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for args in inputs:
                fn(*args)
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception:  # noqa: BLE001 - an op with a host sync cannot be captured; time it eagerly
        torch.cuda.synchronize()
        return None


def _on_cuda(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)


@dataclass
class Timing:
    """Median milliseconds per call, the spread (max/min of the middle half) and how it was timed."""

    median_ms: float
    spread: float
    mode: str
    calls: int


def time_op(fn: Callable, inputs: Sequence[tuple], device: torch.device, graph: bool = True,
            target_ms: float = 60.0, min_reps: int = 5, max_reps: int = 200) -> Timing:
    """Time fn(*args) over rotating input sets.

    Args:
        fn: the op; its result is ignored.
        inputs: input sets (tuples of args), rotated call by call.
        device: where the op runs.
        graph: try to capture a CUDA graph of one pass over the sets first.
        target_ms: about how long to spend timing (after warm-up).
    Returns:
        A Timing with the median time of one call.
    """
    device = torch.device(device)
    clock = _Clock(device)
    for args in inputs[:2]:
        fn(*args)  # compile, allocate, pick algorithms
    clock.sync()
    captured = _capture(fn, inputs) if graph else None
    if captured is not None:
        run_pass, calls, mode = captured.replay, len(inputs), "graph"
    else:
        position = [0]

        def run_pass():
            fn(*inputs[position[0] % len(inputs)])
            position[0] += 1
        calls, mode = 1, "eager"
    start = clock.mark()
    for _ in range(3):
        run_pass()
    end = clock.mark()
    clock.sync()
    estimate = max(clock.elapsed_ms(start, end) / 3, 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / estimate)))
    times = []
    for _ in range(reps):
        start = clock.mark()
        run_pass()
        end = clock.mark()
        times.append((start, end))
    clock.sync()
    per_call = sorted(clock.elapsed_ms(s, e) / calls for s, e in times)
    middle = per_call[len(per_call) // 4: max(len(per_call) * 3 // 4, 1)]
    return Timing(statistics.median(per_call), middle[-1] / max(middle[0], 1e-9), mode, calls)


# ---- roofline -----------------------------------------------------------------

@dataclass
class Roofline:
    """The device's limits measured in this run.

    Attributes:
        device_name: what the driver calls the device.
        copy_gbps: device-to-device copy, GB/s counting bytes read plus written.
        bf16_tflops: torch BF16 matmul at 8192^3.
        fp8_tensorwise_tflops, fp8_blockwise_tflops: torch._scaled_mm at 8192^3 (None where it fails).
    """

    device_name: str
    copy_gbps: float
    bf16_tflops: float
    fp8_tensorwise_tflops: float | None
    fp8_blockwise_tflops: float | None

    def peak(self, key: str) -> float | None:
        """The limit named `key` ("copy", "bf16", "fp8_blockwise", "fp8_tensorwise")."""
        return {"copy": self.copy_gbps, "bf16": self.bf16_tflops, "fp8_tensorwise": self.fp8_tensorwise_tflops,
                "fp8_blockwise": self.fp8_blockwise_tflops}[key]


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def random_fp8(rows: int, cols: int, dtype: torch.dtype, device, generator=None) -> torch.Tensor:
    """Random FP8 values (normal, so every exponent is exercised), never zeros."""
    return (torch.randn(rows, cols, device=device, generator=generator) * 4).to(dtype)


def scaled_mm_blockwise(qa: torch.Tensor, scale_a: torch.Tensor, qw: torch.Tensor, scale_w: torch.Tensor,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The torch._scaled_mm block-wise peer: qa [M, K] FP8 with scale_a [M, K/128] (column-major, as
    cuBLAS wants it), qw [N, K] FP8 with scale_w [N/128, K/128]; returns [M, N]."""
    return torch._scaled_mm(qa, qw.t(), scale_a=scale_a, scale_b=scale_w.t(), out_dtype=out_dtype)


def column_major(scale: torch.Tensor) -> torch.Tensor:
    """The same [M, K/128] values stored with strides (1, M)."""
    return scale.t().contiguous().t()


def measure_roofline(device, fp8_dtype: torch.dtype | None = torch.float8_e4m3fn, size: int = 8192,
                     copy_bytes: int = 1 << 30) -> Roofline:
    """Measure copy bandwidth and matmul rates on `device` (on random data, never zeros)."""
    device = torch.device(device)
    src = torch.randn(copy_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_op(lambda: dst.copy_(src), [()], device, graph=False)
    copy_gbps = 2 * copy_bytes / (t.median_ms * 1e-3) / 1e9
    del src, dst
    flops = 2 * size ** 3
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    bf16 = flops / (time_op(lambda: a @ b.t(), [()], device, graph=False).median_ms * 1e-3) / 1e12
    tensorwise = blockwise = None
    if fp8_dtype is not None and device.type == "cuda":
        qa, qb = a.to(fp8_dtype), b.to(fp8_dtype)
        one = torch.ones((), device=device)
        try:
            t = time_op(lambda: torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                        [()], device, graph=False)
            tensorwise = flops / (t.median_ms * 1e-3) / 1e12
        except (RuntimeError, NotImplementedError):
            pass
        sa = column_major(torch.rand(size, size // BLOCK, device=device) + 0.5)
        sb = torch.rand(size // BLOCK, size // BLOCK, device=device) + 0.5
        try:
            t = time_op(lambda: scaled_mm_blockwise(qa, sa, qb, sb), [()], device, graph=False)
            blockwise = flops / (t.median_ms * 1e-3) / 1e12
        except (RuntimeError, NotImplementedError):
            pass
    return Roofline(device_name(device), copy_gbps, bf16, tensorwise, blockwise)


# ---- records --------------------------------------------------------------------

@dataclass
class Record:
    """One implementation timed on one case.

    Attributes:
        op: "gemm", "moe" or "mla".
        case: the shape, e.g. "M=64 N=7168 K=16384".
        impl: who ran it ("dsv3 cuda: triton fp8 gemm (decode)", "torch._scaled_mm block-wise", ...).
        ours: this row is dsv3's (peers are compared against it).
        flops: floating-point operations of the op.
        bytes: the fewest bytes it must move (each input read once, each output written once).
        compute: the matmul rate it is held against: "fp8_blockwise", "fp8_tensorwise" or "bf16".
        time_ms: median time of one call, None where it failed.
        mode: "graph" or "eager".
        error: why it failed (one line), else None.
        vs_peers: peer impl -> peer time / our time (> 1: dsv3 is faster); dsv3's rows only.
        roofline_pct: the floor max(bytes / copy bandwidth, flops / matmul rate) over the time, in percent.
        limit: "memory" or "compute", whichever term of the floor is larger.
    """

    op: str
    case: str
    impl: str
    ours: bool
    flops: float
    bytes: float
    compute: str
    time_ms: float | None = None
    mode: str = ""
    error: str | None = None
    vs_peers: dict[str, float] = field(default_factory=dict)
    roofline_pct: float | None = None
    limit: str = ""

    @property
    def tflops(self) -> float | None:
        return None if self.time_ms is None else self.flops / (self.time_ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float | None:
        return None if self.time_ms is None else self.bytes / (self.time_ms * 1e-3) / 1e9

    def to_dict(self) -> dict:
        return {**asdict(self), "tflops": self.tflops, "gbps": self.gbps}


def run_case(records: list[Record], op: str, case: str, impl: str, fn: Callable, inputs: Sequence[tuple],
             device, flops: float, bytes_moved: float, compute: str, ours: bool = False,
             graph: bool = True, target_ms: float = 60.0) -> Record:
    """Time one implementation on one case and append its record (a failure is recorded, not raised)."""
    record = Record(op, case, impl, ours, flops, bytes_moved, compute)
    try:
        timing = time_op(fn, inputs, device, graph=graph, target_ms=target_ms)
        record.time_ms, record.mode = timing.median_ms, timing.mode
    except Exception as e:  # noqa: BLE001 - a peer that does not support a shape is a result
        record.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    records.append(record)
    return record


def finish(records: list[Record], roofline: Roofline) -> None:
    """Fill each record's percent of roofline, and each of dsv3's rows' ratios to the peers of its case."""
    for r in records:
        rate = roofline.peak(r.compute) or roofline.bf16_tflops
        memory_ms = r.bytes / (roofline.copy_gbps * 1e9) * 1e3
        compute_ms = r.flops / (rate * 1e12) * 1e3
        r.limit = "memory" if memory_ms >= compute_ms else "compute"
        if r.time_ms is not None:
            r.roofline_pct = 100.0 * max(memory_ms, compute_ms) / r.time_ms
    for r in records:
        if not r.ours or r.time_ms is None:
            continue
        r.vs_peers = {peer.impl: peer.time_ms / r.time_ms for peer in records
                      if not peer.ours and peer.op == r.op and peer.case == r.case and peer.time_ms is not None}


# ---- output ----------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_roofline(roofline: Roofline) -> str:
    return (f"{roofline.device_name}: copy {roofline.copy_gbps:.0f} GB/s (read+write), BF16 matmul "
            f"{roofline.bf16_tflops:.0f} TFLOPS, FP8 _scaled_mm tensor-wise {_fmt(roofline.fp8_tensorwise_tflops, 0)}"
            f" / block-wise {_fmt(roofline.fp8_blockwise_tflops, 0)} TFLOPS (8192^3)")


def format_table(records: list[Record]) -> str:
    """A plain-text table: one row per record, dsv3's rows marked with '*' and followed by peer ratios."""
    header = ["op", "case", "impl", "ms", "TFLOPS", "GB/s", "% roof", "peer time / dsv3 time"]
    rows = [header]
    for r in records:
        if r.error:
            rows.append([r.op, r.case, ("* " if r.ours else "  ") + r.impl, "fails", "", "", "", r.error[:70]])
            continue
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.vs_peers.items())
        rows.append([r.op, r.case, ("* " if r.ours else "  ") + r.impl, _fmt(r.time_ms, 4), _fmt(r.tflops),
                     _fmt(r.gbps, 0), f"{_fmt(r.roofline_pct, 0)} {r.limit[:3]}", ratios])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    """Versions worth recording beside a result (no vendor import: triton's version comes from metadata)."""
    from importlib import metadata

    versions = {"torch": torch.__version__}
    for name in ("triton", "pytorch-triton-rocm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_json(path: str | Path, roofline: Roofline, records: list[Record], extra: dict | None = None) -> None:
    """Write the roofline, the records and the environment to `path` as JSON."""
    payload = {"roofline": asdict(roofline), "environment": environment(), **(extra or {}),
               "records": [r.to_dict() for r in records]}
    Path(path).write_text(json.dumps(payload, indent=1))
