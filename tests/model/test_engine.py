"""Caching and generation: decode equals a full forward, ragged batches equal single prompts.

A tiny synthetic model (configs/tiny.yaml, random weights) in fp32 on the reference backend, so
that every comparison is exact up to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.engine import Engine, SamplingParams
from dsv3.errors import Dsv3Error

MAX_SEQ_LEN = 40


@pytest.fixture(scope="module")
def model():
    return dsv3.load_model("tiny", backend="reference", precision="fp32", max_batch_size=3,
                           max_seq_len=MAX_SEQ_LEN, seed=7, quiet=True)


def random_tokens(model, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (length,), generator=generator).tolist()


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((actual.double() - expected.double()).norm() / expected.double().norm()) <= tolerance


def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence from position 0 at every step (no decode
    path), stopping after an EOS token."""
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(model.logits(torch.tensor([sequence]))[0, -1].argmax()))
        if sequence[-1] in model.config.eos_token_ids:
            break
    return sequence[len(prompt):]


# ---- the cache --------------------------------------------------------------------------------

def test_token_by_token_decode_equals_whole_sequence(model):
    tokens = torch.tensor([random_tokens(model, 24, seed=1), random_tokens(model, 24, seed=2)])
    whole = model.logits(tokens)
    t = model.transformer
    slots = torch.arange(2)
    steps = [t.prefill(tokens[:, :1], slots)[:, 0]]
    for position in range(1, tokens.shape[1]):
        steps.append(t.decode(tokens[:, position], slots, torch.full((2,), position)))
    assert close(torch.stack(steps, dim=1), whole)


def test_ragged_decode_equals_each_sequence_alone(model):
    """Two sequences at different positions decode in one batch (per-sequence lengths in attention)."""
    a, b = random_tokens(model, 20, seed=3), random_tokens(model, 13, seed=4)
    expected_a, expected_b = model.logits(torch.tensor([a]))[0], model.logits(torch.tensor([b]))[0]
    t = model.transformer
    prefix_a, prefix_b = 9, 2
    t.prefill(torch.tensor([a[:prefix_a]]), torch.tensor([0]))
    t.prefill(torch.tensor([b[:prefix_b]]), torch.tensor([2]))  # a non-contiguous cache row
    got_a, got_b = [], []
    for step in range(len(b) - prefix_b):
        pa, pb = prefix_a + step, prefix_b + step
        logits = t.decode(torch.tensor([a[pa], b[pb]]), torch.tensor([0, 2]), torch.tensor([pa, pb]))
        got_a.append(logits[0])
        got_b.append(logits[1])
    assert close(torch.stack(got_a), expected_a[prefix_a:prefix_a + len(got_a)])
    assert close(torch.stack(got_b), expected_b[prefix_b:])


def test_prefill_after_a_cached_prefix_equals_one_prefill(model):
    tokens = torch.tensor([random_tokens(model, 30, seed=5), random_tokens(model, 30, seed=6)])
    whole = model.logits(tokens)
    t = model.transformer
    slots = torch.tensor([1, 0])
    first = t.prefill(tokens[:, :11], slots)
    rest = t.prefill(tokens[:, 11:], slots, start_pos=11)
    assert close(torch.cat((first, rest), dim=1), whole)


def test_bf16_decode_follows_the_whole_sequence():
    """The bf16 cache and activations: token-by-token logits stay within bf16 rounding of one prefill."""
    model = dsv3.load_model("tiny", backend="reference", precision="bf16", max_batch_size=1, max_seq_len=32,
                            seed=7, quiet=True)
    tokens = torch.tensor([random_tokens(model, 20, seed=8)])
    whole = model.logits(tokens)
    t = model.transformer
    steps = [t.prefill(tokens[:, :1], torch.tensor([0]))[:, 0]]
    for position in range(1, tokens.shape[1]):
        steps.append(t.decode(tokens[:, position], torch.tensor([0]), torch.tensor([position])))
    assert close(torch.stack(steps, dim=1), whole, tolerance=2e-2)


# ---- generation -------------------------------------------------------------------------------

def test_greedy_generation_equals_recomputing_the_sequence(model):
    for seed in (9, 10):
        prompt = random_tokens(model, 7, seed=seed)
        assert model.generate([prompt], max_new_tokens=6) == [greedy_without_cache(model, prompt, 6)]


def test_ragged_batch_generates_what_each_prompt_alone_generates(model):
    prompts = [random_tokens(model, n, seed=10 + n) for n in (3, 11, 6)]
    alone = [model.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert model.generate(prompts, max_new_tokens=8) == alone
    assert len({tuple(a) for a in alone}) == 3  # the prompts really lead to different text


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model):
    prompts = [random_tokens(model, 5, seed=20), random_tokens(model, 9, seed=21)]
    hot = dict(max_new_tokens=8, temperature=5.0)
    first = model.generate(prompts, seed=1, **hot)
    assert model.generate(prompts, seed=1, **hot) == first
    assert model.generate(prompts, seed=2, **hot) != first
    greedy = model.generate(prompts, max_new_tokens=8)
    assert first != greedy
    assert model.generate(prompts, seed=3, top_p=1e-6, **hot) == greedy


def test_stop_token_ends_only_its_sequence(model):
    prompts = [random_tokens(model, 4, seed=30), random_tokens(model, 6, seed=31)]
    greedy = model.generate(prompts, max_new_tokens=6)
    stop = greedy[0][1]
    assert stop not in greedy[1]
    params = SamplingParams(max_new_tokens=6, stop_ids=(stop,))
    out = Engine(model.transformer).generate(prompts, params)
    assert out == [greedy[0][:2], greedy[1]]


def test_generation_stops_at_the_end_of_the_cache(model):
    prompt = random_tokens(model, MAX_SEQ_LEN - 2, seed=40)
    out = model.generate([prompt], max_new_tokens=10)
    assert out == [greedy_without_cache(model, prompt, 2)]


def test_generate_with_streaming_callback(model):
    prompts = [random_tokens(model, 5, seed=50), random_tokens(model, 3, seed=51)]
    seen: list[tuple[int, int]] = []
    out = model.generate(prompts, max_new_tokens=4, on_token=lambda i, token: seen.append((i, token)))
    assert [token for i, token in seen if i == 0] == out[0]
    assert [token for i, token in seen if i == 1] == out[1]


# ---- errors before any work -------------------------------------------------------------------

@pytest.mark.parametrize("prompts, message", [
    ([[5] * MAX_SEQ_LEN], "max_seq_len=40"),
    ([[5, 6]] * 4, "exceed max_batch_size=3"),
    ([[5], []], "prompt 1 is empty"),
    ([[5, 512]], "token id 512 outside the vocabulary"),
    ([], "no prompts"),
])
def test_bad_prompts_fail_before_any_work(model, prompts, message):
    caches = [c.clone() for c in model.transformer.caches]
    with pytest.raises(Dsv3Error, match=message) as error:
        model.generate(prompts, max_new_tokens=4)
    assert "\n" not in str(error.value)
    assert all(torch.equal(a, b) for a, b in zip(caches, model.transformer.caches))


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_settings_are_named(model, options, message):
    with pytest.raises(Dsv3Error, match=message):
        model.generate([[5, 6]], **options)


def test_text_prompts_need_a_tokenizer(model):
    with pytest.raises(Dsv3Error, match="no tokenizer"):
        model.generate(["hello"])


def test_logits_refuse_oversized_input(model):
    with pytest.raises(Dsv3Error, match="max_seq_len"):
        model.logits(torch.zeros(1, MAX_SEQ_LEN + 1, dtype=torch.long))
