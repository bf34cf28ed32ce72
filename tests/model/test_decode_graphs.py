"""The engine's decode runner: batch buckets, static buffers, padding rows, recorded steps.

On the CPU a fake backend "records" a step by keeping it (replay reruns it on the bucket's
buffers), which exercises the bucket and padding logic; the reference backend records nothing,
so the runner falls back to eager steps. On an NVIDIA GPU (marker `gpu`) the CUDA backend
captures real CUDA graphs, whose replays must match eager steps.
"""

from __future__ import annotations

import pytest
import torch
from dsv3.backends.reference import ReferenceBackend

import dsv3
from dsv3.engine import DecodeRunner, Engine, SamplingParams, batch_buckets, spare_slots
from dsv3.errors import Dsv3Error

MAX_SEQ_LEN = 40


class KeepingBackend(ReferenceBackend):
    """The reference backend whose graph_runner returns the step itself (and counts the calls)."""

    def __init__(self):
        super().__init__("cpu")
        self.recorded = 0

    def graph_runner(self, step):
        self.recorded += 1
        return step


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: on a loaded 2-core machine two threads spin against each other (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return dsv3.load_model("tiny", backend=KeepingBackend(), precision="fp32", max_batch_size=4,
                           max_seq_len=MAX_SEQ_LEN, seed=7, quiet=True)


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((actual.double() - expected.double()).norm() / expected.double().norm()) <= tolerance


def random_prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- buckets and spare rows -----------------------------------------------------------------------

@pytest.mark.parametrize("max_batch, expected", [(1, (1,)), (3, (1, 2, 3)), (8, (1, 2, 4, 8)),
                                                 (100, (1, 2, 4, 8, 16, 32, 64, 100))])
def test_batch_buckets(max_batch, expected):
    assert batch_buckets(max_batch) == expected


def test_bucket_is_the_smallest_that_holds_the_batch(model):
    runner = DecodeRunner(model.transformer)
    assert [runner.bucket(b) for b in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(Dsv3Error, match="max_batch_size=4"):
        runner.bucket(5)


def test_spare_slots_are_unused_and_distinct():
    slots = torch.tensor([4, 0, 2])
    spare = spare_slots(slots, 8, 5)
    assert sorted(spare.tolist()) == [1, 3, 5, 6, 7]
    assert spare_slots(slots, 8, 2).tolist() == [1, 3]
    assert spare_slots(slots, 8, 0).numel() == 0


# ---- recorded steps on the CPU ----------------------------------------------------------------------

def test_padded_bucket_equals_eager_and_leaves_real_caches_alone(model):
    """Three sequences at slots 0, 2, 3 run in bucket 4: the padding row takes slot 1, writes only its
    position 0 there, and the real rows' logits and cache writes equal an eager step's."""
    t = model.transformer
    torch.manual_seed(0)
    for cache in t.caches:
        cache.normal_()
    before = [cache.clone() for cache in t.caches]
    tokens, slots, positions = torch.tensor([5, 9, 11]), torch.tensor([0, 2, 3]), torch.tensor([7, 12, 3])
    expected = t.decode(tokens, slots, positions)
    after_eager = [cache.clone() for cache in t.caches]
    for cache, saved in zip(t.caches, before):
        cache.copy_(saved)

    runner = DecodeRunner(t)
    got = runner(tokens, slots, positions).clone()
    assert runner.recorded_buckets == (4,)
    assert got.shape == expected.shape
    assert close(got, expected)
    for cache, eager, saved in zip(t.caches, after_eager, before):
        # fp32 GEMMs over 4 rows instead of 3 may block differently: a few 1e-6 apart on some CPUs
        assert torch.allclose(cache[slots], eager[slots], rtol=1e-4, atol=1e-5)
        assert torch.equal(cache[1, 1:], saved[1, 1:])  # the padding row wrote position 0 of slot 1 only
        assert not torch.equal(cache[1, 0], saved[1, 0])


def test_runner_records_each_bucket_once_and_replays_new_inputs(model):
    t, backend = model.transformer, model.backend
    runner = DecodeRunner(t)
    first = backend.recorded
    slots = torch.tensor([1])
    a = runner(torch.tensor([5]), slots, torch.tensor([3])).clone()
    b = runner(torch.tensor([6]), slots, torch.tensor([4])).clone()
    runner(torch.tensor([6, 7]), torch.tensor([0, 1]), torch.tensor([4, 4]))
    runner(torch.tensor([8]), slots, torch.tensor([5]))
    assert backend.recorded - first == 2
    assert runner.recorded_buckets == (1, 2)
    assert not torch.equal(a, b)  # the second replay read the new token, not the recorded one
    assert close(b, t.decode(torch.tensor([6]), slots, torch.tensor([4])))


def test_greedy_tokens_equal_with_and_without_recorded_steps(model):
    vocab = model.config.vocab_size
    prompts = [random_prompt(9, 1, vocab), random_prompt(4, 2, vocab), random_prompt(13, 3, vocab)]
    params = SamplingParams(max_new_tokens=10, stop_ids=())
    eager = Engine(model.transformer, graphs=False).generate(prompts, params)
    recorded_before = model.backend.recorded
    engine = Engine(model.transformer, graphs=True)
    replayed = engine.generate(prompts, params)
    assert replayed == eager
    assert all(len(tokens) == 10 for tokens in replayed)
    assert engine.decoder.recorded_buckets == (4,)  # three prompts, padded to four rows
    assert model.backend.recorded - recorded_before == 1


def test_backend_without_recordings_runs_eagerly():
    model = dsv3.load_model("tiny", backend="reference", precision="fp32", max_batch_size=2,
                            max_seq_len=MAX_SEQ_LEN, seed=7, quiet=True)
    t = model.transformer
    runner = DecodeRunner(t)
    args = torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([2, 5])
    got = runner(*args)
    assert not runner.graphs and runner.recorded_buckets == ()
    assert close(got, t.decode(*args))


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


def _tiny_on_cuda(backend, precision: str, max_batch_size: int):
    from dsv3.api import TINY_CHECKPOINT

    source = TINY_CHECKPOINT if (TINY_CHECKPOINT / "config.json").exists() else "tiny"
    return dsv3.load_model(str(source), backend=backend, precision=precision, max_batch_size=max_batch_size,
                           max_seq_len=64, progress=False, quiet=True)


@pytest.mark.gpu
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_cuda_graph_decode_equals_eager(cuda_backend, precision):
    """Two steps from CUDA graph replays equal eager steps (the caches restored in between); the second
    replay reads its new inputs."""
    model = _tiny_on_cuda(cuda_backend, precision, 4)
    t = model.transformer
    lengths = [5, 9, 3, 12]
    for slot, length in enumerate(lengths):
        t.prefill(torch.tensor([random_prompt(length, slot, model.config.vocab_size)], device="cuda"),
                  torch.tensor([slot], device="cuda"))
    slots = torch.arange(4, device="cuda")
    runner = DecodeRunner(t)
    for step in range(2):
        tokens = torch.tensor(random_prompt(4, 10 + step, model.config.vocab_size), device="cuda")
        positions = torch.tensor(lengths, device="cuda") + step
        saved = [cache.clone() for cache in t.caches]
        eager = t.decode(tokens, slots, positions).clone()
        for cache, before in zip(t.caches, saved):
            cache.copy_(before)
        replayed = runner(tokens, slots, positions).clone()
        assert runner.recorded_buckets == (4,)
        error = ((replayed - eager).abs().max() / eager.abs().max()).item()
        assert error <= 1e-2, f"step {step}: graph logits differ from eager by {error:.2e}"
        for row in (replayed.argmax(-1) != eager.argmax(-1)).nonzero()[:, 0].tolist():
            top2 = eager[row].topk(2).values  # the MoE's atomic sums may break a near-tie either way
            assert ((top2[0] - top2[1]) / eager[row].abs().max()).item() < 1e-2, f"step {step} row {row}"


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_greedy_tokens_equal_with_and_without_graphs(cuda_backend):
    """Three prompts (a padded bucket of four) generate the same greedy tokens from graph replays as
    eagerly; where they part, the eager logits' top two must tie."""
    model = _tiny_on_cuda(cuda_backend, "fp8", 4)
    prompts = [[1, 5, 9, 200, 3], [7, 7, 7], [42, 17, 99, 3, 5, 8, 13]]
    params = SamplingParams(max_new_tokens=16)
    eager = Engine(model.transformer, graphs=False).generate(prompts, params)
    engine = Engine(model.transformer, graphs=True)
    replayed = engine.generate(prompts, params)
    assert engine.decoder.recorded_buckets == (4,)
    for prompt, got, expected in zip(prompts, replayed, eager):
        parted = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        if parted is None:
            assert len(got) == len(expected)
            continue
        row = model.logits(torch.tensor([prompt + expected], device="cuda"))[0, len(prompt) - 1 + parted]
        top2 = row.topk(2).values
        assert ((top2[0] - top2[1]) / row.abs().max()).item() < 1e-2, f"tokens part at step {parted}"


@pytest.mark.gpu
@pytest.mark.cuda
def test_cuda_graphs_record_again_after_every_graph_is_gone(cuda_backend):
    """A model, its runner and their graphs dropped, a new model on the same backend still records its
    steps (torch cannot reopen a graph pool whose graphs are all gone: the backend starts a new one)."""
    import gc
    import warnings

    for round_ in range(3):
        model = _tiny_on_cuda(cuda_backend, "bf16", 2)
        runner = DecodeRunner(model.transformer)
        tokens, slots = torch.tensor([3, 4], device="cuda"), torch.arange(2, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture warns and decodes eagerly
            runner(tokens, slots, torch.tensor([0, 0], device="cuda"))
        assert runner.recorded_buckets == (2,), f"round {round_}"
        del model, runner
        gc.collect()
