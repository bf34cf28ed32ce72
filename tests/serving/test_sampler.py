"""The sampler: greedy, seeded draws independent of the batch, truncation, penalties, logprobs."""

from __future__ import annotations

import torch

from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence
from dsv3.serving.sampler import Sampler, apply_penalties, truncate

VOCAB = 50


def seq(name="a", tokens=(1, 2, 3), generated=(), **params) -> Sequence:
    p = SamplingParams(**params).resolved()
    s = Sequence(name, name, 0, list(tokens) + list(generated), len(tokens), p, max_model_len=100)
    if p.seed is not None:
        s.generator = torch.Generator().manual_seed(p.seed)
    return s


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_the_argmax():
    x = logits(3)
    assert Sampler("cpu")(x, [seq(temperature=0.0) for _ in range(3)]).tokens == x.argmax(-1).tolist()


def test_a_seeded_request_draws_the_same_tokens_whatever_is_batched_with_it():
    x = logits(1, seed=3)

    def draws(batch_with: int) -> list[int]:
        sampler, target = Sampler("cpu", seed=batch_with), seq(temperature=1.0, seed=11)
        others = [seq(f"o{i}", temperature=1.0) for i in range(batch_with)]
        out = []
        for _ in range(20):
            rows = torch.cat([logits(batch_with, seed=len(out) + 100), x]) if batch_with else x
            out.append(sampler(rows, others + [target]).tokens[-1])
        return out

    alone = draws(0)
    assert draws(3) == alone and draws(7) == alone
    assert len(set(alone)) > 3  # really sampling


def test_draws_follow_the_probabilities():
    x = torch.full((1, VOCAB), -30.0)
    x[0, 4], x[0, 9] = 0.0, torch.log(torch.tensor(3.0))
    sampler, s = Sampler("cpu"), seq(temperature=1.0)
    picks = [sampler(x, [s]).tokens[0] for _ in range(2000)]
    assert set(picks) == {4, 9}
    assert 0.70 < picks.count(9) / len(picks) < 0.80


def test_truncation_top_k_top_p_min_p():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **p: (truncate(x, [SamplingParams(**p).resolved()]) > float("-inf"))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.1) == [True, False, False, False]
    assert kept(min_p=0.4) == [True, True, False, False]
    assert kept() == [True] * 4


def test_penalties():
    x = torch.tensor([[2.0, -2.0, 1.0, 1.0, 0.5]])
    s = seq(tokens=(0, 1), generated=(2, 2), repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(x, [s])[0].tolist()
    assert out == [1.0, -4.0, 0.5 - 0.5 - 0.5, 1.0, 0.5]
    s = seq(tokens=(4,), generated=(3,), temperature=0.0, presence_penalty=2.0)
    assert Sampler("cpu")(x, [s]).tokens == [0]


def test_logprobs_are_the_top_k_and_the_sampled_token():
    x = logits(2)
    out = Sampler("cpu")(x, [seq(temperature=0.0, logprobs=3), seq(temperature=0.0)])
    assert out.logprobs[1] is None
    expected = x[0].log_softmax(-1)
    top = expected.topk(3)
    assert list(out.logprobs[0]) == top.indices.tolist()
    assert torch.allclose(torch.tensor(list(out.logprobs[0].values())), top.values)
    x2 = torch.zeros(1, VOCAB)
    x2[0, 7] = 5.0
    sampled = Sampler("cpu")(x2, [seq(temperature=1.0, logprobs=0, seed=1)])
    assert list(sampled.logprobs[0]) == sampled.tokens  # logprobs=0: the sampled token only
