"""The scheduler: decodes first, chunked prefill under the budget, admission, preemption of the newest."""

from __future__ import annotations

from dsv3.serving.block_manager import BlockManager
from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence, Status
from dsv3.serving.scheduler import Scheduler


def seq(name: str, length: int, first: int = 0) -> Sequence:
    tokens = list(range(first, first + length))
    return Sequence(name, name, 0, tokens, length, SamplingParams().resolved(), max_model_len=1000)


def run(scheduler: Scheduler):
    """One step: schedule, mark computed, append a token to every sequence that sampled."""
    step = scheduler.schedule()
    for s in scheduler.update(step):
        s.token_ids.append(7)
    return step


def test_long_prompt_is_chunked_while_decodes_go_first():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = seq("a", 3)
    sched.add(a)
    run(sched)  # a prefilled and sampled its first token
    b = seq("b", 25, first=100)
    sched.add(b)
    chunks = []
    for _ in range(3):
        step = run(sched)
        assert step.decodes == [a]  # a decodes every step, never stalled by b's prompt
        chunks.append(dict((s.seq_id, n) for s, n in step.prefills)["b"])
    assert chunks == [9, 9, 7] and b.num_computed_tokens == 25 and b.num_tokens == 26
    step = run(sched)
    assert step.decodes == [a, b] and step.num_tokens == 2


def test_admission_respects_max_num_seqs_and_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=8)
    seqs = [seq(str(i), 5, first=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step = run(sched)
    assert [(s.seq_id, n) for s, n in step.prefills] == [("0", 5), ("1", 3)]
    step = run(sched)
    assert step.decodes == [seqs[0]] and [(s.seq_id, n) for s, n in step.prefills] == [("1", 2)]
    assert seqs[2].status is Status.WAITING  # two running already
    sched.finish(seqs[0], "stop")
    step = run(sched)
    assert seqs[2] in [s for s, _ in step.prefills]


def test_out_of_blocks_preempts_the_newest_which_resumes_from_the_front():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable blocks
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 3), seq("b", 3, first=50)
    sched.add(a)
    sched.add(b)
    run(sched)  # each holds 2 blocks (3 tokens + room) and sampled a token
    run(sched)  # the fourth token fits; both sample a fifth
    step = run(sched)  # each needs a third block for its fifth token: b, the newest, goes
    assert step.preempted == [b] and step.decodes == [a]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.finish(a, "stop")
    step = run(sched)
    # recomputed: its first block still cached, its second went to a's third; three tokens to compute
    assert [(s.seq_id, n) for s, n in step.prefills] == [("b", 3)]
    sched.finish(b, "stop")
    assert bm.check_all_free() == []


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    bm = BlockManager(num_blocks=4, block_size=2)  # 3 usable
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq("a", 2), seq("b", 3, first=50)
    sched.add(a)
    sched.add(b)
    run(sched)  # a: 1 block, b: 2 blocks; a now has 3 tokens, needs a second block
    step = run(sched)
    assert step.preempted == [b] and step.decodes == [a]


def test_prefix_cache_hit_skips_the_cached_blocks():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = seq("a", 10)
    sched.add(a)
    run(sched)
    b = seq("b", 11)  # same first 10 tokens
    sched.add(b)
    step = run(sched)
    assert [(s.seq_id, n) for s, n in step.prefills] == [("b", 3)] and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 11, 8)


def test_completions_of_one_prompt_wait_for_the_first_to_compute_it():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first, second = seq("r#0", 9), seq("r#1", 9)
    second.leader = first
    sched.add(first)
    sched.add(second)
    step = run(sched)
    assert [s for s, _ in step.prefills] == [first]
    step = run(sched)
    assert second in step.decodes and second.num_cached_tokens == 8  # one token left to compute


def test_a_request_with_many_sequences_does_not_hold_back_a_new_one():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=64)
    big = [Sequence(f"big#{i}", "big", i, [1, 2, 3], 3, SamplingParams().resolved(), max_model_len=1000)
           for i in range(6)]
    for s in big:
        sched.add(s)
    run(sched)
    assert [s.seq_id for s in sched.running] == ["big#0", "big#1", "big#2"]
    small = seq("small", 3, first=40)
    sched.add(small)
    step = run(sched)  # the newest of big's running sequences makes room: small starts at once
    assert small in [s for s, _ in step.prefills] and big[2].status is Status.WAITING
    assert [s.seq_id for s in sched.running] == ["big#0", "big#1", "small"]
    sched.finish(big[0], "stop")
    step = run(sched)  # the freed slot goes back to big, whose sequences wait in their order
    assert [s.seq_id for s, _ in step.prefills] == ["big#2"]
