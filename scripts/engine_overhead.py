"""The serving engine's host overhead on the CPU: median inter-token latency over a stubbed device step.

What it measures: `dsv3 bench serve` in-process (64 concurrent streaming requests through AsyncEngine,
each timed per output by dsv3.bench.serve_load's EngineTarget in an asyncio consumer of this process) on
the built-in tiny checkpoint, with the model's device work replaced by a stub device:

- a decode step "replays a recording" (the engine's recorded-bucket path: ModelRunner._fill and the
  bucket's replay) whose replay only enqueues --device-ms of device time and returns at once, as a CUDA
  graph launch does; a prefill runs eagerly and enqueues --prefill-ms per 1k tokens;
- the host waits for the device where a GPU run does: when it reads the sampled tokens (the sampler's
  result), sleeping until the queued device time is over, with the GIL released like a CUDA sync.

Everything else (scheduler, block manager, the runner's input filling, sampler, detokenizer, outputs,
delivery to the asyncio thread, the consumer's per-token work) is the real code. The ratio
median ITL / device step is the engine's cost per decode step (issue 19 wants at most 1.1x); the CPU of
this machine is not the GPU host's, so the absolute host milliseconds differ, the structure does not.

    python scripts/engine_overhead.py [--device-ms 15] [--concurrency 64] [--output-len 128] [--consumer-us 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch


class StubDevice:
    """A device queue: work is enqueued without blocking, `sync` sleeps until all of it is done."""

    def __init__(self):
        self.ready_at = 0.0
        self.lock = threading.Lock()
        self.idle_gaps: list[float] = []  # device idle between two decode steps: the exposed host time
        self.last_was_decode = False

    def launch(self, seconds: float, decode: bool = False) -> None:
        with self.lock:
            now = time.perf_counter()
            if decode and self.last_was_decode:
                self.idle_gaps.append(max(0.0, now - self.ready_at))
            self.last_was_decode = decode
            self.ready_at = max(now, self.ready_at) + seconds

    def sync(self) -> None:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)


def stub_engine(engine, device: StubDevice, device_ms: float, prefill_ms_per_1k: float, seed: int = 0) -> None:
    """Replace the engine's device work (decode replays, eager forwards) with `device` time."""
    from dsv3.serving.model_runner import _Bucket

    runner, vocab = engine.runner, engine.vocab_size
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(64, runner.buckets[-1], vocab, generator=g)
    counter = iter(range(1 << 62))

    def record(size, shared, rows):
        bucket = _Bucket(tokens=torch.zeros(size, dtype=torch.long), positions=torch.zeros(size, dtype=torch.long),
                         block_tables=torch.zeros(size, runner.max_blocks_per_seq, dtype=torch.int32),
                         seq_lens=torch.ones(size, dtype=torch.int32),
                         logits=torch.zeros(size, vocab), replay=lambda: None)
        runner._fill(bucket, rows)

        def replay():
            bucket.logits.copy_(bank[next(counter) % len(bank), :size])  # the "device" writes its output
            device.launch(device_ms / 1e3, decode=True)

        bucket.replay = replay
        runner._recorded[(size, shared)] = bucket
        return bucket

    def forward(batch):
        device.launch(prefill_ms_per_1k / 1e3 * batch.tokens.numel() / 1024)
        rows = batch.logits_indices.numel()
        return bank[next(counter) % len(bank), :1].expand(rows, vocab).clone() if rows else torch.empty(0, vocab)

    runner._record = record
    runner.graphs = True
    runner._recorded.clear()
    runner.model.forward = forward
    sampler = engine.sampler
    real_call = type(sampler).__call__

    class SyncedSampler(type(sampler)):
        def __call__(self, logits, seqs):
            device.sync()  # the host reads the sampled tokens: wait for the device
            return real_call(self, logits, seqs)

    sampler.__class__ = SyncedSampler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-ms", type=float, default=15.0, help="stub device time of one decode step")
    p.add_argument("--prefill-ms", type=float, default=10.0, help="stub device time per 1k prefill tokens")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--consumer-us", type=float, default=0.0, help="extra consumer work per output, in Python "
                   "holding the GIL (an HTTP server's JSON and SSE framing; default 0: bench serve's own)")
    p.add_argument("--repeats", type=int, default=1, help="runs (after one warm-up run); medians of each printed")
    args = p.parse_args(argv)

    from dsv3.api import TINY_CHECKPOINT, load_model
    from dsv3.bench.serve_load import EngineTarget, random_requests, run_load

    torch.set_num_threads(1)
    max_len = args.input_len + args.output_len
    checkpoint = Path(tempfile.mkdtemp(prefix="dsv3-overhead-"))  # the tiny checkpoint, longer positions
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_CHECKPOINT / name, checkpoint / name)
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], max_len)
    (checkpoint / "config.json").write_text(json.dumps(config))
    model = load_model(checkpoint, backend="reference", precision="bf16", quiet=True, progress=False,
                       load_format="dummy", max_model_len=max_len, max_num_seqs=args.concurrency,
                       cache_tokens=args.concurrency * max_len + 1024)
    shutil.rmtree(checkpoint)
    engine = model.engine
    device = StubDevice()
    stub_engine(engine, device, args.device_ms, args.prefill_ms)
    target = EngineTarget(model.async_engine)
    if args.consumer_us:  # an HTTP server's per-output work (JSON, SSE framing), holding the GIL
        generate = model.async_engine.generate

        async def heavier(*a, **k):
            async for output in generate(*a, **k):
                end = time.perf_counter() + args.consumer_us / 1e6
                while time.perf_counter() < end:
                    pass
                yield output

        target.engine = SimpleNamespace(generate=heavier, stats=model.async_engine.stats)
    vocab = engine.vocab_size

    async def run(seed: int):
        requests = random_requests(args.concurrency, args.input_len, args.output_len, vocab, seed=seed)
        results, duration = await run_load(target, requests, args.concurrency, tag=f"r{seed}")
        bad = [r.error for r in results if r.error]
        if bad:
            raise SystemExit(f"engine_overhead: {len(bad)} requests failed: {bad[0]}")
        # the decode phase only: gaps after every request has its first token
        itl = [x for r in results for x in r.itl[2:]]
        gaps, device.idle_gaps = device.idle_gaps, []
        return statistics.median(itl) * 1e3, statistics.mean(itl) * 1e3, statistics.median(gaps) * 1e3, duration

    asyncio.run(run(10_000))  # warm-up (buckets recorded, caches warm)
    for i in range(args.repeats):
        median, mean, gap, duration = asyncio.run(run(i))
        print(f"median ITL {median:6.2f} ms  mean {mean:6.2f} ms  device step {args.device_ms:.2f} ms  "
              f"ratio {median / args.device_ms:.3f}  device idle between decode steps {gap:.2f} ms (median)  "
              f"({duration:.1f} s)", flush=True)
    model.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
