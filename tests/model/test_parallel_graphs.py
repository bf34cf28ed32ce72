"""The tensor/expert-parallel model on one GPU (a one-rank NCCL group): its decode steps record as CUDA graphs
and it gives the one-process model's greedy tokens and logits. Skipped cleanly without an NVIDIA GPU.

The rank runs in a process of its own (spawned), so the process group never outlives the test. The same
worker runs on the CPU with the reference backend and gloo (where nothing records) to keep it honest there.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch

PROMPTS = [[5, 17, 99, 3], [200, 7], [11, 12, 13, 14, 15]]
NEW_TOKENS = 8


def one_rank(backend_name: str, precision: str, port: int, out: str) -> None:
    """Load the built-in tiny checkpoint in one process and as a one-rank ParallelTransformer; save both
    models' greedy tokens, logits and recorded decode batch sizes to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        from dsv3 import parallel
        from dsv3.api import TINY_CHECKPOINT, Model, load_model
        from dsv3.checkpoint import CheckpointSource
        from dsv3.serving.engine import LLMEngine

        # Both models share the engine config: a cache sized in tokens, since two caches of
        # gpu_memory_utilization x the GPU each would not fit in one process.
        one = load_model(TINY_CHECKPOINT, backend=backend_name, precision=precision, quiet=True, max_model_len=64,
                         max_num_seqs=4, cache_tokens=1024)
        plan = parallel.ParallelPlan(rank=0, world_size=1, local_rank=0, tp=1, ep=1)
        transformer = parallel.build(plan, one.config, one.backend, CheckpointSource(TINY_CHECKPOINT),
                                     one.precision, 64, progress=False)
        ranked = Model(transformer, None, LLMEngine(transformer, one.engine.config))
        results = {}
        for name, model in (("one process", one), ("tp 1", ranked)):
            results[name] = {"tokens": model.greedy_tokens(PROMPTS, NEW_TOKENS),
                             "logits": model.logits([PROMPTS[0]]).cpu(),
                             "recorded": model.engine.runner.recorded_buckets}
        torch.save(results, out)
    except BaseException:
        Path(out).with_suffix(".failed").write_text(traceback.format_exc())
        raise


def run_one_rank(backend_name: str, precision: str, tmp_path: Path) -> dict:
    from test_parallel import _free_port

    out = tmp_path / "results.pt"
    process = multiprocessing.get_context("spawn").Process(
        target=one_rank, args=(backend_name, precision, _free_port(), str(out)))
    process.start()
    process.join(600)
    if process.is_alive():
        process.kill()
        process.join()
    failed = out.with_suffix(".failed")
    assert process.exitcode == 0 and not failed.exists(), failed.read_text() if failed.exists() else process.exitcode
    return torch.load(out)


def _check(results: dict, tolerance: float) -> None:
    one, ranked = results["one process"], results["tp 1"]
    assert ranked["tokens"] == one["tokens"]
    error = (ranked["logits"] - one["logits"]).abs().max() / one["logits"].abs().max()
    assert error <= tolerance, error
    assert ranked["recorded"] == one["recorded"]


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_one_rank_parallel_model_records_its_decode_steps(tmp_path, precision):
    """The step has no host sync: a sync inside capture fails it (the backend then warns and runs it eagerly,
    recording nothing), so the same recorded sizes as one process mean every decode step recorded."""
    results = run_one_rank("cuda", precision, tmp_path)
    _check(results, 1e-3)
    assert results["tp 1"]["recorded"], "no decode step was recorded"


@pytest.mark.distributed
@pytest.mark.slow
def test_the_worker_on_the_cpu(tmp_path):
    """The same worker with the reference backend and gloo: equal tokens and logits, nothing recorded."""
    results = run_one_rank("reference", "fp32", tmp_path)
    _check(results, 1e-6)
    assert results["tp 1"]["recorded"] == ()
