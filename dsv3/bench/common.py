"""Timing, roofline and result records shared by the `dsv3 bench` subcommands.

How an op is timed (`time_op`): a few warm-up calls, then the op over several
input sets in rotation (so that no set stays in the L2 cache between calls),
timed with device events, the median taken. Where the backend records graphs
(`Backend.graph_runner`: CUDA/HIP graphs) one pass over the sets is recorded and
its replays are timed, so launch gaps do not count; an op that cannot be
recorded is timed eagerly, and the record says which.

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

from dsv3.backends.fp8 import BLOCK
from dsv3.backends.interface import Backend

ROTATION_BYTES = 256 << 20  # rotate input sets until they span this many bytes (several L2s)
MAX_ROTATION = 64


# ---- timing -----------------------------------------------------------------

def rotation_count(bytes_per_set: int, budget: int = ROTATION_BYTES, limit: int = MAX_ROTATION) -> int:
    """How many distinct input sets to rotate through so that together they exceed the caches."""
    return max(1, min(limit, math.ceil(budget / max(bytes_per_set, 1))))


class Clock:
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


@dataclass
class Timing:
    """Median milliseconds per call, the spread (max/min of the middle half), how it was timed
    ("graph": replays of the backend's recorded graph; "eager"), calls per timed pass and passes timed."""

    median_ms: float
    spread: float
    mode: str
    calls: int
    reps: int


def time_op(fn: Callable, inputs: Sequence[tuple], backend: Backend, graph: bool = True, target_ms: float = 60.0,
            min_reps: int = 5, max_reps: int = 200, warmup: int = 2) -> Timing:
    """Time fn(*args) over rotating input sets on the backend's device: the one timer of `dsv3 bench`.

    Args:
        fn: the op; its result is ignored.
        inputs: input sets (tuples of args), rotated call by call.
        backend: whose device the op runs on, and whose graph_runner records one pass over the sets.
        graph: time replays of a recorded pass where the backend records one (else eagerly).
        target_ms: about how long to spend timing (after warm-up).
        min_reps, max_reps: bounds on the passes timed.
        warmup: untimed calls first (compile, allocate, pick algorithms).
    Returns:
        A Timing with the median time of one call.
    """
    clock = Clock(backend.device)
    for index in range(warmup):
        fn(*inputs[index % len(inputs)])
    clock.sync()
    replay = backend.graph_runner(lambda: [fn(*args) for args in inputs]) if graph else None
    if replay is not None:
        run_pass, calls, mode = replay, len(inputs), "graph"
    else:
        position = [0]

        def run_pass():
            fn(*inputs[position[0] % len(inputs)])
            position[0] += 1
        calls, mode = 1, "eager"
    start = clock.mark()
    run_pass()
    end = clock.mark()
    clock.sync()
    estimate = max(clock.elapsed_ms(start, end), 1e-3)
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
    return Timing(statistics.median(per_call), middle[-1] / max(middle[0], 1e-9), mode, calls, reps)


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


def measure_roofline(backend: Backend, size: int = 8192, copy_bytes: int = 1 << 30) -> Roofline:
    """Measure copy bandwidth and matmul rates on the backend's device (on random data, never zeros); the FP8
    rates in the backend's FP8 format."""
    device, fp8_dtype = backend.device, backend.capabilities.fp8_dtype
    buffers = [torch.randn(copy_bytes // 2, device=device, dtype=torch.bfloat16)]
    buffers.append(torch.empty_like(buffers[0]))
    t = time_op(lambda src, dst: dst.copy_(src), [tuple(buffers)], backend, graph=False)
    copy_gbps = 2 * copy_bytes / (t.median_ms * 1e-3) / 1e9
    buffers.clear()
    flops = 2 * size ** 3
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    bf16 = flops / (time_op(lambda: a @ b.t(), [()], backend, graph=False).median_ms * 1e-3) / 1e12
    tensorwise = blockwise = None
    if fp8_dtype is not None and device.type != "cpu":
        qa, qb = a.to(fp8_dtype), b.to(fp8_dtype)
        one = torch.ones((), device=device)
        try:
            t = time_op(lambda: torch._scaled_mm(qa, qb.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                        [()], backend, graph=False)
            tensorwise = flops / (t.median_ms * 1e-3) / 1e12
        except (RuntimeError, NotImplementedError):
            pass
        sa = column_major(torch.rand(size, size // BLOCK, device=device) + 0.5)
        sb = torch.rand(size // BLOCK, size // BLOCK, device=device) + 0.5
        try:
            t = time_op(lambda: scaled_mm_blockwise(qa, sa, qb, sb), [()], backend, graph=False)
            blockwise = flops / (t.median_ms * 1e-3) / 1e12
        except (RuntimeError, NotImplementedError):
            pass
    return Roofline(backend.device_name(), copy_gbps, bf16, tensorwise, blockwise)


# ---- records --------------------------------------------------------------------

@dataclass
class Record:
    """One row of any `dsv3 bench`: an op timed on one case, a whole model step, or a serving run.

    Attributes:
        what: the bench: "gemm", "moe", "mla" (ops), "decode", "prefill" (steps) or "serve".
        impl: who ran it ("dsv3 cuda: triton fp8 gemm (decode)", "reference backend (eager)", a server URL, ...).
        ours: this row is dsv3's (peers are compared against it).
        time_ms: median time of one call or step; None where it failed, and for serve (its latencies are metrics).
        error: why it failed (one line), else None.
        metrics: the bench's own numbers, named as in the JSON (written beside the fields above):
            ops (op_record, finish): case, flops, bytes, compute, mode, vs_peers, roofline_pct, limit, tflops, gbps;
            steps (steps.make_record): batch, context, layers, the floor and its ratios, note;
            serve (serve_records.summarize): vLLM `bench serve`'s names.
    """

    what: str
    impl: str
    ours: bool = False
    time_ms: float | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON row: the fields and the metrics side by side (non-finite floats as "inf", "nan")."""
        row = {"what": self.what, "impl": self.impl, "ours": self.ours, "time_ms": self.time_ms, "error": self.error,
               **self.metrics}
        return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}

    @classmethod
    def from_dict(cls, row: dict) -> "Record":
        """A record from its JSON row (to_dict)."""
        fields = ("what", "impl", "ours", "time_ms", "error")
        return cls(row["what"], row["impl"], row.get("ours", False), row.get("time_ms"), row.get("error"),
                   {k: v for k, v in row.items() if k not in fields})


def error_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def op_record(op: str, case: str, impl: str, ours: bool, flops: float, bytes_moved: float, compute: str,
              error: str | None = None) -> Record:
    """An op bench's record before it is timed.

    Args:
        op: "gemm", "moe" or "mla".
        case: the shape, e.g. "M=64 N=7168 K=16384".
        flops: floating-point operations of the op.
        bytes_moved: the fewest bytes it must move (each input read once, each output written once).
        compute: the matmul rate it is held against: "fp8_blockwise", "fp8_tensorwise" or "bf16".
    Returns:
        The record; `finish` adds vs_peers (peer impl -> peer time / our time, dsv3's rows only),
        roofline_pct (the floor max(bytes / copy bandwidth, flops / matmul rate) over the time, in percent),
        limit ("memory" or "compute", the larger term of the floor), tflops and gbps.
    """
    return Record(op, impl, ours, error=error,
                  metrics={"case": case, "flops": flops, "bytes": bytes_moved, "compute": compute, "mode": ""})


def run_case(records: list[Record], op: str, case: str, impl: str, fn: Callable, inputs: Sequence[tuple],
             backend: Backend, flops: float, bytes_moved: float, compute: str, ours: bool = False,
             graph: bool = True, target_ms: float = 60.0) -> Record:
    """Time one implementation on one case on the backend's device and append its record (a failure is
    recorded, not raised)."""
    record = op_record(op, case, impl, ours, flops, bytes_moved, compute)
    try:
        timing = time_op(fn, inputs, backend, graph=graph, target_ms=target_ms)
        record.time_ms, record.metrics["mode"] = timing.median_ms, timing.mode
    except Exception as e:  # noqa: BLE001 - a peer that does not support a shape is a result
        record.error = error_line(e)
    records.append(record)
    return record


def finish(records: list[Record], roofline: Roofline) -> None:
    """Fill each op record's rates and percent of roofline, and each of dsv3's rows' ratios to the peers of its
    case."""
    for r in records:
        m, seconds = r.metrics, None if r.time_ms is None else r.time_ms * 1e-3
        rate = roofline.peak(m["compute"]) or roofline.bf16_tflops
        memory_ms = m["bytes"] / (roofline.copy_gbps * 1e9) * 1e3
        compute_ms = m["flops"] / (rate * 1e12) * 1e3
        m["vs_peers"], m["limit"] = {}, "memory" if memory_ms >= compute_ms else "compute"
        m["roofline_pct"] = None if seconds is None else 100.0 * max(memory_ms, compute_ms) / r.time_ms
        m["tflops"] = None if seconds is None else m["flops"] / seconds / 1e12
        m["gbps"] = None if seconds is None else m["bytes"] / seconds / 1e9
    for r in records:
        if not r.ours or r.time_ms is None:
            continue
        r.metrics["vs_peers"] = {peer.impl: peer.time_ms / r.time_ms for peer in records
                                 if not peer.ours and peer.what == r.what and peer.metrics["case"] == r.metrics["case"]
                                 and peer.time_ms is not None}


# ---- output ----------------------------------------------------------------------

def fmt(value: float | None, spec: str = ".1f") -> str:
    """`value` formatted with `spec`, or "-" where there is none (every bench table's cells)."""
    return "-" if value is None else format(value, spec)


def format_roofline(roofline: Roofline) -> str:
    return (f"{roofline.device_name}: copy {roofline.copy_gbps:.0f} GB/s (read+write), BF16 matmul "
            f"{roofline.bf16_tflops:.0f} TFLOPS, FP8 _scaled_mm tensor-wise "
            f"{fmt(roofline.fp8_tensorwise_tflops, '.0f')} / block-wise {fmt(roofline.fp8_blockwise_tflops, '.0f')} "
            "TFLOPS (8192^3)")


def _op_cells(r: Record) -> tuple[list[str], list[str]]:
    m = r.metrics
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in m["vs_peers"].items())
    return ([r.what, m["case"], ("* " if r.ours else "  ") + r.impl],
            [fmt(r.time_ms, ".4f"), fmt(m["tflops"]), fmt(m["gbps"], ".0f"),
             f"{fmt(m['roofline_pct'], '.0f')} {m['limit'][:3]}", ratios])


def _step_cells(r: Record) -> tuple[list[str], list[str]]:
    m = r.metrics
    return ([r.impl, str(m["batch"]), str(m["context"]), str(m["layers"])],
            [fmt(r.time_ms, ".3f"), fmt(m["tokens_per_s"], ".1f"), f"{fmt(m['floor_ms'], '.3f')} {m['limit'][:3]}",
             fmt(m["vs_floor"], ".2f"), fmt(m["fp8_rate_pct"], ".0f"), fmt(m["experts_hit"], ".1f"),
             "-" if m["vs_reference"] is None else f"{m['vs_reference']:.1f}x", m["note"]])


#: each kind of table: its header and the cells of a row (the labels, then the values)
TABLES = {"op": (["op", "case", "impl", "ms", "TFLOPS", "GB/s", "% roof", "peer time / dsv3 time"], _op_cells),
          "step": (["impl", "batch", "context", "layers", "ms/step", "tokens/s", "floor ms", "x floor", "% fp8",
                    "experts/layer", "vs reference", "note"], _step_cells)}


def format_table(records: list[Record]) -> str:
    """A plain-text table, one row per record: the op benches' columns (dsv3's rows marked with '*' and followed
    by peer ratios), or whole steps' (decode, prefill). A failed row says "fails" and why."""
    header, cells = TABLES["step" if records and records[0].what in ("decode", "prefill") else "op"]
    rows = [header]
    for r in records:
        labels, values = cells(r)
        if r.error:
            values = ["fails"] + [""] * (len(values) - 2) + [r.error[:80]]
        rows.append(labels + values)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
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


def save_json(path: str | Path, roofline: Roofline | None, records: Sequence[Record],
              extra: dict | None = None) -> None:
    """Write `extra` (what, date, device, backend, model, notes, ...), the roofline where the bench measured one,
    the environment and the records to `path` as JSON: the one writer of every bench's --json."""
    payload = {**(extra or {}), **({"roofline": asdict(roofline)} if roofline else {}), "environment": environment(),
               "records": [r.to_dict() for r in records]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
