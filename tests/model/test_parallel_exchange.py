"""The MoE exchange without host syncs, and data-parallel attention, on the CPU with gloo.

Each rank builds the tiny model (4 heads, 8 experts, fp32) for a layout, runs its DP group's own
requests through its own engine (its own latent cache) in lockstep with the other groups, a group
with nothing left to do joining every step with a 0-token batch, and saves its greedy tokens, the
logits of its group's own prompts, and every host sync a step made. The tests compare each group
with the one-process model on the same prompts.
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
from dsv3.backends.interface import plain
from test_parallel import relative_error, run_world, tiny16_config, write_checkpoint

from dsv3.config import load_config
from dsv3.model import ForwardBatch

pytestmark = pytest.mark.distributed

#: each DP group's own prompts and new tokens; group 1 stops early, so it runs 0-token steps while group 0 decodes
GROUP_PROMPTS = [[[5, 17, 99, 3], [200, 7]], [[11, 12, 13, 14, 15, 16]]]
GROUP_NEW_TOKENS = [6, 2]
GROUP_LOGITS = [torch.tensor([[3, 141, 59, 265, 35]]), torch.tensor([[323, 84, 62], [64, 33, 83]])]

LAYOUTS = {  # world size -> (tp, ep, dp)
    2: [(2, 2, 1), (1, 2, 2)],
    4: [(2, 4, 2)],
}
#: FP8 compute through the exchange: the tiny config with 16 experts whose cuts fall on 128 boundaries
FP8_LAYOUTS = {2: [(1, 2, 2)], 4: [(2, 4, 2)]}
#: more of them under -m exhaustive: dp 4; tp 4; dp 2 x tp 2 with each expert split over 2 ranks
EXHAUSTIVE_LAYOUTS = {4: [(1, 4, 4), (4, 4, 1), (2, 2, 2)]}
GROUP_PROMPTS += [[[21, 22]], [[31, 32, 33, 34, 35, 36, 37]]]  # groups 2 and 3 of dp 4
GROUP_NEW_TOKENS += [4, 1]
GROUP_LOGITS += [torch.tensor([[7, 8, 9, 10]]), torch.tensor([[99]])]

#: the tensor methods that wait for the device (or copy to the host)
SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "unique", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts calls of SYNCS while active, by (method, calling file)."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self._saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def __enter__(self):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name, original):
        def call(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            self.calls[name, Path(caller).parent.name + "/" + Path(caller).name] += 1
            return original(tensor, *args, **kwargs)
        return call


def sync_free_backend(device="cpu"):
    """The reference backend with a grouped MoE that never waits for the device: every expert runs on every
    row, weighted by the routing (0 where not chosen). A step on it must make no host sync at all. Its
    graph_runner "records" a step by keeping it (and counts), so the engine's decode steps run as replays.
    Each call keeps (pairs not marked -1, those of them on a local expert, all pairs) for the tests."""
    from dsv3.backends.reference import ReferenceBackend

    class SyncFree(ReferenceBackend):
        recorded = 0
        pairs: list[torch.Tensor] = []

        def graph_runner(self, step):
            self.recorded += 1
            return step

        def moe_experts(self, x, weights, ids, experts):
            x = plain(x)
            kept = ids >= 0
            self.pairs.append(torch.stack((kept.sum(), (kept & (ids < experts.num_experts)).sum(),
                                           ids.new_tensor(ids.numel()))))
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            inter = experts.intermediate_size
            for expert in range(experts.num_experts):
                gate_up = self._matmul(x, experts.gate_up[expert], None)
                y = self._matmul(torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:],
                                 experts.down[expert], None)
                out += y.float() * (weights * (ids == expert)).sum(-1, keepdim=True)
            return out.to(x.dtype)
    return SyncFree(device)


def empty_batch(device) -> ForwardBatch:
    nothing = torch.empty(0, dtype=torch.long, device=device)
    return ForwardBatch(nothing, nothing, 0, None, None)


def run_group(transformer, plan, prompts, new_tokens, eager=True) -> tuple[list[list[int]], collections.Counter]:
    """Greedy tokens of this DP group's prompts from its own engine, every group stepping together; and the
    host syncs inside the model's steps (dp_num_tokens comes from the driver, as the engine's step plan gives it)."""
    from dsv3 import distributed
    from dsv3.serving.engine import EngineConfig, LLMEngine
    from dsv3.serving.params import SamplingParams

    engine = LLMEngine(transformer, EngineConfig(max_model_len=32, block_size=4, num_blocks=40, max_num_seqs=4,
                                                 max_num_batched_tokens=64, enforce_eager=eager))
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    counter, forward = SyncCounter(), transformer.forward

    def step(batch, caches=None):
        counts = distributed.all_gather_objects(batch.num_tokens)[::plan.tp]
        batch.dp_num_tokens = tuple(counts) if plan.dp > 1 else None
        with counter:
            return forward(batch, caches)
    transformer.forward = step
    outputs = {}
    try:
        while True:
            busy = engine.has_unfinished_requests()
            if not any(distributed.all_gather_objects(busy)):
                break
            if busy:
                outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
            else:
                transformer.forward(empty_batch(transformer.backend.device))
    finally:
        del transformer.forward
    return [outputs[str(i)] for i in range(len(prompts))], counter.calls


def _worker(rank: int, world: int, port: int, job: tuple[str, str, dict], out: Path) -> None:
    """job: (the tiny checkpoint, the 16-expert one, world size -> layouts)."""
    checkpoint, checkpoint16, layouts = job
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dsv3.backends.reference import ReferenceBackend

    from dsv3 import parallel
    from dsv3.checkpoint import CheckpointSource
    try:
        config = load_config(checkpoint)
        results = {}
        for tp, ep, dp in layouts[world]:
            plan = parallel.ParallelPlan(rank, world, rank, tp, ep, dp)
            group = plan.dp_rank
            for name, backend in (("reference", ReferenceBackend("cpu")), ("sync-free", sync_free_backend())):
                model = parallel.build(plan, config, backend, CheckpointSource(checkpoint), "fp32", 32,
                                       progress=False)
                tokens, syncs = run_group(model, plan, GROUP_PROMPTS[group], GROUP_NEW_TOKENS[group],
                                          eager=name == "reference")
                result = {"tokens": tokens, "syncs": dict(syncs), "recorded": getattr(backend, "recorded", 0),
                          "pairs": torch.stack(backend.pairs) if name == "sync-free" else None}
                if name == "reference":
                    result["logits"] = model.logits(GROUP_LOGITS[group])
                    if dp > 1:  # group 1 idles through a round: group 0's requests stay out of its cache
                        for cache in model.caches:
                            cache.zero_()
                        idle = run_group(model, plan, GROUP_PROMPTS[0] if group == 0 else [], 3)[0]
                        result["idle round"] = (idle, [float(c.abs().sum()) for c in model.caches])
                results[tp, ep, dp, name] = result
        for tp, ep, dp in FP8_LAYOUTS[world] if layouts is LAYOUTS else []:
            plan = parallel.ParallelPlan(rank, world, rank, tp, ep, dp)
            model = parallel.build(plan, load_config(checkpoint16), ReferenceBackend("cpu"),
                                   CheckpointSource(checkpoint16), "fp8", 32, progress=False)
            results[tp, ep, dp, "fp8"] = model.logits(GROUP_LOGITS[plan.dp_rank])
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.failed").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("exchange") / "tiny", load_config("tiny")))


@pytest.fixture(scope="module")
def checkpoint16(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("exchange16") / "tiny16", tiny16_config()))


@pytest.fixture(scope="module")
def worlds(checkpoint, checkpoint16, tmp_path_factory) -> dict:
    cache = {}

    def get(world: int, exhaustive: bool = False) -> list[dict]:
        if (world, exhaustive) not in cache:
            layouts = EXHAUSTIVE_LAYOUTS if exhaustive else LAYOUTS
            out = tmp_path_factory.mktemp(f"world{world}")
            cache[world, exhaustive] = run_world(world, (checkpoint, checkpoint16, layouts), out, worker=_worker)
        return cache[world, exhaustive]
    return get


@pytest.fixture(scope="module")
def single(checkpoint) -> dict:
    """DP group -> (greedy tokens, logits) of one process on that group's prompts."""
    from dsv3.api import load_model
    model = load_model(checkpoint, backend="reference", precision="fp32", quiet=True, max_batch_size=4,
                       max_seq_len=32)
    return {group: (model.greedy_tokens(prompts, GROUP_NEW_TOKENS[group]), model.logits(GROUP_LOGITS[group]))
            for group, prompts in enumerate(GROUP_PROMPTS)}


def cases(data_parallel_only: bool = False) -> list:
    """(world, layout) parameters; EXHAUSTIVE_LAYOUTS's marked exhaustive."""
    return [pytest.param(world, layout, marks=[pytest.mark.exhaustive] if many is EXHAUSTIVE_LAYOUTS else [],
                         id="tp{}-ep{}-dp{}".format(*layout))
            for many in (LAYOUTS, EXHAUSTIVE_LAYOUTS) for world, layouts in many.items() for layout in layouts
            if layout[2] > 1 or not data_parallel_only]


def _world(world: int, layout: tuple, worlds) -> list[dict]:
    return worlds(world, exhaustive=layout not in LAYOUTS.get(world, []))


@pytest.mark.parametrize("world,layout", cases())
def test_each_group_matches_one_process(world, layout, worlds, single):
    """Greedy tokens identical and logits within 1e-5 of one process, for every DP group's own prompts."""
    tp, ep, dp = layout
    for rank, result in enumerate(_world(world, layout, worlds)):
        group = rank // tp if dp > 1 else 0
        want_tokens, want_logits = single[group]
        reference = result[tp, ep, dp, "reference"]
        assert reference["tokens"] == want_tokens, f"rank {rank} (DP group {group})"
        assert relative_error(reference["logits"], want_logits).max() <= 1e-5, f"rank {rank}"
        assert result[tp, ep, dp, "sync-free"]["tokens"] == want_tokens, f"rank {rank} (sync-free backend)"


@pytest.mark.parametrize("world,layout", cases())
def test_a_step_makes_no_host_sync(world, layout, worlds):
    """With a backend whose ops never sync, a whole step (exchange included) makes no host sync, and the
    engine records the parallel model's decode steps; with the reference backend, the only syncs are its
    own MoE op's (it sizes each expert's rows on the host)."""
    tp, ep, dp = layout
    for rank, result in enumerate(_world(world, layout, worlds)):
        assert result[tp, ep, dp, "sync-free"]["syncs"] == {}, f"rank {rank}"
        assert result[tp, ep, dp, "sync-free"]["recorded"] > 0, f"rank {rank}"
        syncs = result[tp, ep, dp, "reference"]["syncs"]
        assert syncs and {where for _, where in syncs} == {"backends/reference.py"}, f"rank {rank}: {syncs}"


@pytest.mark.parametrize("world,layout", cases())
def test_each_rank_runs_only_its_own_pairs(world, layout, worlds):
    """Every MoE call hands the grouped op this rank's pairs (local expert ids) and marks the rest -1, so over
    the ranks each (token, expert) pair runs once per slice of its expert (world / ep slices)."""
    tp, ep, dp = layout
    pairs = torch.stack([result[tp, ep, dp, "sync-free"]["pairs"] for result in _world(world, layout, worlds)])
    kept, local, total = pairs.unbind(-1)  # [rank, call]
    assert torch.equal(kept, local), "a pair not marked -1 names an expert this rank does not hold"
    assert (total == total[0]).all()
    assert torch.equal(kept.sum(0), total[0] * (world // ep)), (kept, total)
    assert (kept < total).any(), "no pair was marked -1: the test routed nothing to another rank"


@pytest.mark.parametrize("world,layout", cases(data_parallel_only=True))
def test_an_idle_group_keeps_its_cache_empty(world, layout, worlds, single):
    """Group 1 has no requests: it joins every step with 0 tokens, its latent cache stays all zeros while
    group 0's requests fill group 0's, and group 0 still gets the one-process tokens."""
    tp, ep, dp = layout
    for rank, result in enumerate(_world(world, layout, worlds)):
        tokens, cache_sums = result[tp, ep, dp, "reference"]["idle round"]
        if rank // tp == 0:
            assert tokens == [t[:3] for t in single[0][0]] and all(s > 0 for s in cache_sums), f"rank {rank}"
        else:
            assert tokens == [] and all(s == 0 for s in cache_sums), f"rank {rank}"


@pytest.fixture(scope="module")
def single16(checkpoint16) -> dict:
    """DP group -> one process's (fp8 logits, fp32 logits) of the 16-expert model on the group's prompts."""
    from dsv3.api import load_model
    one = {precision: load_model(checkpoint16, backend="reference", precision=precision, quiet=True,
                                 max_batch_size=2, max_seq_len=32) for precision in ("fp8", "fp32")}
    return {group: (one["fp8"].logits(tokens), one["fp32"].logits(tokens)) for group, tokens in enumerate(GROUP_LOGITS)}


@pytest.mark.parametrize("world,layout", [(w, layout) for w, layouts in FP8_LAYOUTS.items() for layout in layouts],
                         ids=lambda v: v if isinstance(v, int) else "tp{}-ep{}-dp{}".format(*v))
def test_fp8_through_the_exchange_stays_within_fp8_noise(world, layout, worlds, single16):
    """FP8 compute rounds each rank's partial sums before the cross-rank sum: each group's logits must stay
    within the distance FP8 itself puts between one process and fp32 (as tests/model/test_parallel.py asks)."""
    tp = layout[0]
    for rank, result in enumerate(worlds(world)):
        want, exact = single16[rank // tp]
        error, noise = relative_error(result[(*layout, "fp8")], want), relative_error(want, exact)
        assert error.median() <= noise.median() * 1.5, f"rank {rank}: error {error}, noise {noise}"
        assert (error <= 2 * noise.max()).float().mean() >= 0.8, f"rank {rank}: error {error}, noise {noise}"
