"""The engine's guarantees where steps are recorded, so that short prompt chunks run as decode rows.

A backend that records steps (CUDA graphs) runs every step whose tokens fit the largest batch bucket as
decode rows: the uncached tail of a cached prompt, the chunks of a small token budget, the recompute of a
preempted request. On the CPU the reference backend stands in for one, its "recording" being the step itself,
so these are the same forward as a GPU replays. Greedy tokens must equal the plain eager engine's in every
case, and every block must come back.
"""

from __future__ import annotations

import random

import pytest
from dsv3.backends.reference import ReferenceBackend
from serving_helpers import tiny

from dsv3.serving.params import SamplingParams

PROMPTS = ["Once upon a time", "The backend of the model is", "A", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend "
           "chips from one codebase, and this tiny model learned"]


class Recording(ReferenceBackend):
    """The reference backend with a graph_runner that keeps the step (a recording replayed in Python)."""

    def __init__(self):
        super().__init__("cpu")

    def graph_runner(self, step):
        return step


def greedy(max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def recorded(**options):
    return tiny(backend=Recording(), max_num_seqs=16, **options)


def count_row_steps(model) -> list[int]:
    """Counts (into the returned list) the replays of steps with chunk rows."""
    runner, calls = model.engine.runner, []
    for (_, shared), bucket in runner._recorded.items():
        if shared:
            replay = bucket.replay
            bucket.replay = lambda replay=replay: (calls.append(1), replay())
    return calls


@pytest.fixture(scope="module")
def expected():
    """Each prompt's greedy tokens from the eager engine, run alone."""
    m = tiny()
    try:
        return [m.generate(p, greedy())[0].outputs[0].token_ids for p in PROMPTS]
    finally:
        m.shutdown()


def test_prompts_in_chunk_rows_batched_with_decodes_give_the_eager_tokens(expected):
    """A budget of 16 tokens cuts every prompt into chunks that run as rows beside the others' decodes."""
    m = recorded(max_num_batched_tokens=16)
    rows = count_row_steps(m)
    try:
        assert tokens_of(m.generate(PROMPTS, greedy())) == expected
        assert rows, "no step ran chunk rows"
        assert m.engine.block_manager.check_all_free() == []
    finally:
        m.shutdown()


def test_a_cached_prefix_tail_and_a_preempted_recompute_give_the_eager_tokens(expected):
    m = recorded(cache_tokens=96, max_model_len=96)  # 6 blocks: four requests preempt each other
    rows = count_row_steps(m)
    try:
        assert tokens_of(m.generate(PROMPTS, greedy())) == expected
        assert m.engine.stats().num_preemptions > 0
        again = m.generate([PROMPTS[3]], greedy())[0]  # its first blocks are cached now
        assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == expected[3]
        assert rows
        assert m.engine.block_manager.check_all_free() == []
    finally:
        m.shutdown()


def test_random_requests_with_cancels_leave_every_block_free():
    m = recorded(max_num_batched_tokens=32)
    rng = random.Random(3)
    vocab = m.config.vocab_size
    try:
        engine = m.engine
        for i in range(40):
            prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 40))]
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
            if steps % 3 == 0 and engine.requests:
                engine.abort(rng.choice(sorted(engine.requests)))
        assert engine.block_manager.check_all_free() == []
    finally:
        m.shutdown()
