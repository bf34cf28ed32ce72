"""The model runner's recorded decode steps: batch buckets, static buffers, padding rows in block 0.

On the CPU a fake backend "records" a step by keeping it (replay reruns it on the bucket's buffers),
which exercises the bucket and padding logic; the reference backend records nothing, so the runner
runs eagerly. On an NVIDIA GPU (marker `gpu`) the CUDA backend captures real CUDA graphs, whose
replays must match eager steps.
"""

from __future__ import annotations

import pytest
import torch
from dsv3.backends.reference import ReferenceBackend

import dsv3
from dsv3.serving.model_runner import ModelRunner, batch_buckets
from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence
from dsv3.serving.scheduler import ScheduledStep

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BLOCK = 4


class KeepingBackend(ReferenceBackend):
    """The reference backend whose graph_runner returns the step itself (and counts the calls)."""

    def __init__(self):
        super().__init__("cpu")
        self.recorded = 0

    def graph_runner(self, step):
        self.recorded += 1
        return step


def load(backend, **options):
    settings = dict(backend=backend, precision="fp32", max_model_len=40, cache_tokens=160, block_size=BLOCK,
                    max_num_seqs=4, seed=7, quiet=True)
    return dsv3.load_model("tiny", **{**settings, **options})


@pytest.fixture(scope="module")
def model():
    return load(KeepingBackend())


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((actual.double() - expected.double()).norm() / expected.double().norm()) <= tolerance


def random_prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def decoding(model, lengths: list[int], first_block: int = 1) -> list[Sequence]:
    """Sequences whose first length - 1 tokens are cached (random latents) and whose last token decodes next."""
    seqs, block = [], first_block
    for i, length in enumerate(lengths):
        tokens = random_prompt(length, i, model.config.vocab_size)
        seq = Sequence(f"s{i}", f"s{i}", 0, tokens, length, SamplingParams().resolved(), 40)
        blocks = -(-length // BLOCK)
        seq.block_table = list(range(block, block + blocks))
        seq.num_computed_tokens = length - 1
        block += blocks
        seqs.append(seq)
    return seqs


# ---- buckets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_seqs, expected", [(1, (1,)), (3, (1, 2, 3)), (8, (1, 2, 4, 8)),
                                                (100, (1, 2, 4, 8, 16, 32, 64, 100))])
def test_batch_buckets(max_seqs, expected):
    assert batch_buckets(max_seqs) == expected


def test_bucket_is_the_smallest_that_holds_the_batch(model):
    runner = ModelRunner(model.transformer, BLOCK, 4, 40)
    assert [runner.bucket(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]


# ---- recorded steps on the CPU --------------------------------------------------------------------

def test_padded_bucket_equals_eager_and_writes_padding_only_to_block_0(model):
    """Three sequences run in bucket 4: the padding row writes row 0 of block 0 and nothing else; the real
    rows' logits and cache writes equal an eager step's."""
    t = model.transformer
    torch.manual_seed(0)
    for cache in t.caches:
        cache.normal_()
    before = [cache.clone() for cache in t.caches]
    seqs = decoding(model, [7, 13, 3])
    step = ScheduledStep(decodes=seqs)
    _, expected = ModelRunner(t, BLOCK, 4, 40, enforce_eager=True).run(step)
    after_eager = [cache.clone() for cache in t.caches]
    for cache, saved in zip(t.caches, before, strict=True):
        cache.copy_(saved)

    runner = ModelRunner(t, BLOCK, 4, 40)
    _, got = runner.run(step)
    assert runner.recorded_buckets == (4,)
    assert got.shape == expected.shape == (3, model.config.vocab_size)
    assert close(got, expected)
    for cache, eager, saved in zip(t.caches, after_eager, before, strict=True):
        assert torch.allclose(cache[1:], eager[1:], rtol=1e-4, atol=1e-5)  # the sequences' blocks
        assert torch.equal(cache[0, 1:], saved[0, 1:])  # the padding row wrote position 0 of block 0 only
        assert not torch.equal(cache[0, 0], saved[0, 0])


def test_runner_records_each_bucket_once_and_replays_new_inputs(model):
    t, backend = model.transformer, model.backend
    runner = ModelRunner(t, BLOCK, 4, 40)
    first = backend.recorded
    (seq,) = decoding(model, [5])
    _, a = runner.run(ScheduledStep(decodes=[seq]))
    a = a.clone()
    seq.token_ids.append(9)
    seq.num_computed_tokens += 1
    _, b = runner.run(ScheduledStep(decodes=[seq]))
    b = b.clone()
    runner.run(ScheduledStep(decodes=decoding(model, [4, 6], first_block=10)))
    runner.run(ScheduledStep(decodes=[seq]))
    assert backend.recorded - first == 2
    assert runner.recorded_buckets == (1, 2)
    assert not torch.equal(a, b)  # the second replay read the new token and position
    _, eager = ModelRunner(t, BLOCK, 4, 40, enforce_eager=True).run(ScheduledStep(decodes=[seq]))
    assert close(b, eager)


def test_a_one_token_prompt_chunk_in_a_recorded_step_samples_nothing(model):
    """A budget that leaves one token for a prompt makes it a decode row; only the rows that reach their
    sequence's end come back, in order."""
    a, b = decoding(model, [6, 9])
    b.num_computed_tokens -= 3  # three prompt tokens still to compute: this step runs one of them
    step = ScheduledStep(decodes=[b, a])
    seqs, got = ModelRunner(model.transformer, BLOCK, 4, 40).run(step)
    b.num_computed_tokens = 5  # the same inputs again, eagerly
    seqs_eager, expected = ModelRunner(model.transformer, BLOCK, 4, 40, enforce_eager=True).run(step)
    assert seqs == seqs_eager == [a]
    assert got.shape == (1, model.config.vocab_size) and close(got, expected)


def test_a_short_prompt_chunk_runs_as_decode_rows_like_a_prefill(model):
    """A decode and a 3-token prompt chunk fit bucket 4: the step replays the bucket recorded for chunk rows,
    and its logits and cache writes equal those of the same step as a flat batch through mla_prefill."""
    t = model.transformer
    torch.manual_seed(1)
    for cache in t.caches:
        cache.normal_()
    before = [cache.clone() for cache in t.caches]
    a, b = decoding(model, [6, 11], first_block=20)
    b.num_computed_tokens = len(b.token_ids) - 3  # the last three prompt tokens of b are still to compute
    step = ScheduledStep(decodes=[a], prefills=[(b, 3)])
    runner = ModelRunner(t, BLOCK, 4, 40)
    seqs, got = runner.run(step)
    assert runner.recorded_row_buckets == (4,) and seqs == [a, b]
    after_rows = [cache.clone() for cache in t.caches]
    for cache, saved in zip(t.caches, before, strict=True):
        cache.copy_(saved)
    with torch.inference_mode():
        plan = runner.plan(step)[2]
        assert plan.logits_rows == [0, 3]
        expected = t.forward(runner._eager_batch(plan))
    assert got.shape == expected.shape == (2, model.config.vocab_size)
    assert close(got, expected)
    for cache, rows in zip(t.caches, after_rows, strict=True):
        assert torch.allclose(cache[1:], rows[1:], rtol=1e-4, atol=1e-5)


def test_greedy_tokens_equal_with_and_without_recorded_steps():
    backend = KeepingBackend()
    recorded = load(backend)
    eager = load("reference", enforce_eager=True)
    vocab = recorded.config.vocab_size
    prompts = [random_prompt(9, 1, vocab), random_prompt(4, 2, vocab), random_prompt(13, 3, vocab)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    try:
        replayed = [o.outputs[0].token_ids for o in recorded.generate(prompts, params)]
        assert replayed == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        assert all(len(tokens) == 10 for tokens in replayed)
        assert 4 in recorded.engine.runner.recorded_buckets  # three decodes padded to four rows
        assert recorded.engine.block_manager.check_all_free() == []
    finally:
        recorded.shutdown()
        eager.shutdown()


def test_a_cached_prefix_tail_replays_chunk_rows_with_the_eager_engines_tokens():
    """A prompt of 16 tokens (4 blocks) is prefilled eagerly (16 rows fit no bucket); the same prompt with 3 more
    tokens then finds 16 cached and runs its tail as 3 chunk rows in a recorded step. Greedy tokens equal an
    eager engine's without a prefix cache."""
    backend = KeepingBackend()
    recorded = load(backend, max_num_seqs=8)
    eager = load("reference", enforce_eager=True, max_num_seqs=8, enable_prefix_caching=False)
    vocab = recorded.config.vocab_size
    first = random_prompt(16, 5, vocab)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    bucket = recorded.engine.runner._recorded[(4, True)]  # every bucket is recorded when the engine starts
    replays = []
    replay = bucket.replay
    bucket.replay = lambda: (replays.append(bucket.seq_lens.tolist()), replay())
    try:
        for prompt in (first, first + random_prompt(3, 6, vocab)):
            (got,) = recorded.generate([prompt], params)
            (expected,) = eager.generate([prompt], params)
            assert got.outputs[0].token_ids == expected.outputs[0].token_ids
        assert got.num_cached_tokens == 16
        assert replays == [[17, 18, 19, 1]]  # the tail: 3 rows at positions 16-18 (and a padding row) in bucket 4
        assert recorded.engine.block_manager.check_all_free() == []
    finally:
        recorded.shutdown()
        eager.shutdown()


def test_backend_without_recordings_runs_eagerly():
    model = load("reference")
    runner = model.engine.runner
    _, logits = runner.run(ScheduledStep(decodes=decoding(model, [3, 5])))
    assert not runner.graphs and runner.recorded_buckets == ()
    assert logits.shape == (2, model.config.vocab_size)


def test_enforce_eager_never_records():
    assert not ModelRunner(load(KeepingBackend()).transformer, BLOCK, 4, 40, enforce_eager=True).graphs


# ---- CUDA graphs (NVIDIA GPU) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_backend():
    from dsv3.backends.cuda import CudaBackend

    return CudaBackend()


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_graph_runner_replays_without_python(cuda_backend):
    x = torch.zeros(8, device="cuda")
    y = torch.zeros(8, device="cuda")
    calls = []

    def step():
        calls.append(1)
        y.copy_(x * 2 + 1)

    replay = cuda_backend.graph_runner(step)
    assert replay is not None
    recorded_calls = len(calls)
    x.fill_(3.0)
    replay()
    torch.cuda.synchronize()
    assert len(calls) == recorded_calls
    assert torch.equal(y, torch.full_like(y, 7.0))


def _tiny_on_cuda(backend, precision: str, **options):
    from dsv3.api import TINY_CHECKPOINT

    settings = dict(backend=backend, precision=precision, max_num_seqs=4, max_model_len=64, cache_tokens=1024,
                    block_size=16, progress=False, quiet=True)
    return dsv3.load_model(str(TINY_CHECKPOINT), **{**settings, **options})


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_cuda_graph_decode_equals_eager(cuda_backend, precision):
    """Two steps from CUDA graph replays equal eager steps (the caches restored in between); the second
    replay reads its new inputs."""
    model = _tiny_on_cuda(cuda_backend, precision)
    t = model.transformer
    seqs = decoding(model, [5, 9, 3, 12])
    runner, eager_runner = ModelRunner(t, 16, 4, 64), ModelRunner(t, 16, 4, 64, enforce_eager=True)
    for seq in seqs:  # 16-token blocks: re-lay the tables for this block size
        seq.block_table = [1 + int(seq.seq_id[1:])]
    for step in range(2):
        saved = [cache.clone() for cache in t.caches]
        _, eager = eager_runner.run(ScheduledStep(decodes=seqs))
        eager = eager.clone()
        for cache, before in zip(t.caches, saved, strict=True):
            cache.copy_(before)
        _, replayed = runner.run(ScheduledStep(decodes=seqs))
        replayed = replayed.clone()
        assert runner.recorded_buckets == (4,)
        error = ((replayed - eager).abs().max() / eager.abs().max()).item()
        assert error <= 1e-2, f"step {step}: graph logits differ from eager by {error:.2e}"
        for seq in seqs:
            seq.token_ids.append(7)
            seq.num_computed_tokens += 1


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_greedy_tokens_equal_with_and_without_graphs(cuda_backend):
    """Three prompts (a padded bucket of four) generate the same greedy tokens from graph replays as
    eagerly; where they part, the eager logits' top two must tie."""
    graphs, eager = _tiny_on_cuda(cuda_backend, "fp8"), _tiny_on_cuda(cuda_backend, "fp8", enforce_eager=True)
    prompts = [[1, 5, 9, 200, 3], [7, 7, 7], [42, 17, 99, 3, 5, 8, 13]]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    replayed = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    expected_all = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert 4 in graphs.engine.runner.recorded_buckets
    for prompt, got, expected in zip(prompts, replayed, expected_all, strict=True):
        parted = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
        if parted is None:
            assert len(got) == len(expected)
            continue
        row = eager.logits(torch.tensor([prompt + expected], device="cuda"))[0, len(prompt) - 1 + parted]
        top2 = row.topk(2).values
        assert ((top2[0] - top2[1]) / row.abs().max()).item() < 1e-2, f"tokens part at step {parted}"
    graphs.shutdown()
    eager.shutdown()


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_cuda_cached_prefix_tail_replays_chunk_rows(cuda_backend, precision):
    """A 35-token prompt, then the same prompt again: 32 tokens come from the prefix cache and the 3 left run as
    chunk rows in a CUDA graph replay (bucket 4). Both requests' greedy tokens equal an eager engine's without a
    prefix cache, or part only on a near-tie."""
    graphs = _tiny_on_cuda(cuda_backend, precision, max_num_seqs=16)
    eager = _tiny_on_cuda(cuda_backend, precision, enforce_eager=True, enable_prefix_caching=False)
    bucket = graphs.engine.runner._recorded[(4, True)]
    replays = []
    replay = bucket.replay
    bucket.replay = lambda: (replays.append(1), replay())
    prompt = random_prompt(35, 9, graphs.config.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    try:
        for _ in range(2):
            (got,) = graphs.generate([prompt], params)
            (expected,) = eager.generate([prompt], params)
            tokens, ref = got.outputs[0].token_ids, expected.outputs[0].token_ids
            parted = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
            if parted is not None:
                row = eager.logits(torch.tensor([prompt + ref], device="cuda"))[0, len(prompt) - 1 + parted]
                top2 = row.topk(2).values
                assert ((top2[0] - top2[1]) / row.abs().max()).item() < 1e-2, f"tokens part at step {parted}"
        assert got.num_cached_tokens == 32 and replays == [1]
    finally:
        graphs.shutdown()
        eager.shutdown()
