"""MTP speculative decoding on the tiny checkpoint, whose MTP module is trained, so drafts are accepted for real.

Greedy output must equal the plain engine's token for token (batched, chunked, preempted, from the prefix
cache, through recorded chunk rows); sampled output must have the target's distribution exactly (a
chi-square test against the target's own probabilities, with a drafter made poor so that rejections are
common); every block must come back.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from serving_helpers import tiny
from test_recorded_rows import Recording

from dsv3.config import load_config
from dsv3.errors import UsageError
from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence
from dsv3.serving.sampler import Sampler
from dsv3.serving.spec_decode import SpeculativeConfig, _speculative_sample

PROMPTS = ["A mixture of experts", "Once upon a time", "The", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend chips "
           "from one codebase, and this tiny model learned"]


def spec(k: int, **extra) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, **extra}


def greedy(max_tokens: int = 24, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def all_free(model) -> None:
    assert model.engine.block_manager.check_all_free() == []


@pytest.fixture(scope="module")
def expected():
    """Each prompt's greedy tokens from the plain engine."""
    return tokens_of(tiny().generate(PROMPTS, greedy()))


# ---- the config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ('{"method": "eagle"}', "method 'eagle' is not supported"),
    ('{"method": "mtp", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer >= 1"),
    ('{"num_speculative_tokens": "2"}', "num_speculative_tokens must be an integer >= 1"),
    ('{"method": "mtp", "draft_model": "x"}', "unknown field 'draft_model'"),
    ('{"method": "mtp", "disable_by_batch_size": 0}', "disable_by_batch_size must be an integer >= 1"),
    ("{method: mtp}", "not JSON"),
    ("[1]", "must be a JSON object"),
])
def test_bad_config_is_one_line(value, message):
    with pytest.raises(UsageError, match=message) as e:
        SpeculativeConfig.parse(value)
    assert "\n" not in str(e.value)


def test_config_accepts_vllm_names():
    got = SpeculativeConfig.parse('{"method": "deepseek_mtp", "num_speculative_tokens": 3, "disable_by_batch_size": 8}')
    assert got == SpeculativeConfig("deepseek_mtp", 3, 8)


def test_checkpoint_without_mtp_fails_before_loading():
    from dsv3.api import TINY_CHECKPOINT
    config = load_config(TINY_CHECKPOINT).replace(num_nextn_predict_layers=0)
    with pytest.raises(UsageError, match="has no MTP layer"):
        tiny(path_or_config=config, speculative_config=spec(1))


# ---- greedy equals the plain engine ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_identical_batched(expected, k):
    m = tiny(speculative_config=spec(k))
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected
    stats = m.engine.stats().spec_decode
    assert stats.num_drafts > 0 and len(stats.accepted_per_pos) == k
    assert stats.num_accepted_tokens == sum(stats.accepted_per_pos)
    all_free(m)


def test_acceptance_on_the_models_own_text():
    """The tiny model's greedy continuation of its training text: its MTP module predicts it well."""
    m = tiny(speculative_config=spec(1))
    m.generate(["A mixture of experts"], greedy(48))
    stats = m.engine.stats().spec_decode
    rate = stats.num_accepted_tokens / stats.num_draft_tokens
    print(f"tiny checkpoint, k=1: acceptance {rate:.2f}, mean acceptance length {stats.mean_acceptance_length:.2f}")
    assert rate > 0.8


def test_greedy_identical_chunked_and_from_the_prefix_cache(expected):
    m = tiny(speculative_config=spec(2), max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected
    hits = m.engine.stats().prefix_hits
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected  # the prompts' blocks now come from the cache
    assert m.engine.stats().prefix_hits > hits
    all_free(m)


def test_greedy_identical_after_preemption(expected):
    m = tiny(speculative_config=spec(3), cache_tokens=96, max_model_len=96)
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected
    assert m.engine.stats().num_preemptions > 0
    all_free(m)


def test_greedy_identical_through_recorded_rows(expected):
    """Where the backend records steps, verify steps replay the chunk-row recording of their bucket and the MTP
    module fills its cache through decode rows too: the same drafts are accepted as on the eager engine."""
    m = tiny(backend=Recording(), max_num_seqs=8, speculative_config=spec(2))
    assert set(m.engine.runner.recorded_row_buckets) >= {3, 6, 12, 24}  # (batch, k + 1) buckets
    assert max(m.engine.runner.recorded_buckets) == 8  # decodes alone: up to max_num_seqs rows
    assert m.engine.proposer.rows_as_decode
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected
    eager = tiny(max_num_seqs=8, speculative_config=spec(2))
    eager.generate(PROMPTS, greedy())
    got, want = m.engine.stats().spec_decode, eager.engine.stats().spec_decode
    assert abs(got.num_drafts - want.num_drafts) <= 2 and abs(got.num_accepted_tokens - want.num_accepted_tokens) <= 2
    all_free(m)


class CountingRecording(Recording):
    """The CPU stand-in for recorded steps, counting the replays of the draft steps it recorded."""

    def __init__(self):
        super().__init__()
        self.draft_replays = 0

    def graph_runner(self, step):
        if "draft_recording" not in step.__code__.co_filename:
            return step

        def replay():
            self.draft_replays += 1
            step()
        return replay


@pytest.mark.parametrize("k", [1, 3])
def test_recorded_drafts_equal_the_eager_drafts(expected, k):
    """Greedy drafts replay the recorded draft step (cache fill and k proposals per bucket pair): the output is
    the plain engine's, and exactly the drafts the same backend's eager proposer makes are accepted."""
    backend = CountingRecording()
    m = tiny(backend=backend, max_num_seqs=8, speculative_config=spec(k))
    assert tokens_of(m.generate(PROMPTS, greedy())) == expected
    assert m.engine.proposer.recordings.recorded and backend.draft_replays > 0
    eager = tiny(backend=Recording(), max_num_seqs=8, speculative_config=spec(k))
    eager.engine.proposer.recordings = None  # the same decode rows, run eagerly
    assert tokens_of(eager.generate(PROMPTS, greedy())) == expected
    got, want = m.engine.stats().spec_decode, eager.engine.stats().spec_decode
    assert (got.num_drafts, got.num_draft_tokens, got.num_accepted_tokens) == (
        want.num_drafts, want.num_draft_tokens, want.num_accepted_tokens)
    all_free(m)


def test_recorded_drafts_beside_sampled_ones_and_with_speculation_off(expected):
    """A step with a sampled draft runs eagerly, a greedy one replays; past disable_by_batch_size only the
    module's cache fill replays. Greedy output stays the plain engine's, every block comes back."""
    backend = CountingRecording()
    m = tiny(backend=backend, max_num_seqs=8, speculative_config=spec(2, disable_by_batch_size=3))
    engine = m.engine
    for i, prompt in enumerate(PROMPTS):  # four run, then three with a sampled one, then two greedy ones
        params = greedy() if i % 2 else SamplingParams(max_tokens=6 * (i + 1), temperature=0.8, ignore_eos=True,
                                                       seed=i)
        engine.add_request(f"r{i}", m.tokenizer.encode(prompt), params)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [finals[f"r{i}"].outputs[0].token_ids for i in (1, 3)] == [expected[i] for i in (1, 3)]
    assert any(drafting == 0 for _, drafting in engine.proposer.recordings.recorded)  # fill only
    assert any(drafting for _, drafting in engine.proposer.recordings.recorded)
    assert engine.stats().spec_decode.num_drafts > 0
    all_free(m)


def test_requests_see_accepted_tokens_one_by_one():
    """Stop tokens, max_tokens, logprobs, penalties and n > 1 act as on the plain engine."""
    plain, fast = tiny(), tiny(speculative_config=spec(3))
    base = tokens_of(plain.generate(PROMPTS[:1], greedy()))[0]
    cases = [greedy(24, stop_token_ids=[base[9]]), greedy(7), greedy(12, logprobs=2),
             greedy(16, repetition_penalty=1.3, frequency_penalty=0.2), greedy(10, n=2)]
    for params in cases:
        want, got = plain.generate(PROMPTS[:1], params)[0], fast.generate(PROMPTS[:1], params)[0]
        for a, b in zip(want.outputs, got.outputs, strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            if a.logprobs is not None:
                assert [sorted(x) for x in a.logprobs] == [sorted(x) for x in b.logprobs]
                for x, y in zip(a.logprobs, b.logprobs, strict=True):
                    assert all(abs(x[t] - y[t]) < 1e-4 for t in x)
    stop = plain.tokenizer.decode(base[10:12])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    want, got = (m.generate(PROMPTS[:1], params)[0].outputs[0] for m in (plain, fast))
    assert (want.text, want.finish_reason) == (got.text, got.finish_reason)
    all_free(fast)


def test_random_cancels_free_every_block():
    m = tiny(speculative_config=spec(2), max_num_seqs=6, cache_tokens=512)
    engine, rng = m.engine, random.Random(0)
    prompts = [m.tokenizer.encode(p) for p in PROMPTS] * 3
    for i, prompt in enumerate(prompts):
        params = greedy(32) if i % 2 else SamplingParams(max_tokens=32, temperature=0.8, ignore_eos=True, seed=i)
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
        live = list(engine.requests)
        if live and rng.random() < 0.3:
            engine.abort(rng.choice(live))
    all_free(m)


def test_a_failing_verify_step_fails_only_its_request(expected):
    """The batched verify step raises; each sequence then runs alone with its drafts, and only the one that
    still raises fails."""
    m = tiny(speculative_config=spec(2))
    engine, original = m.engine, m.engine.runner.run

    def run(step):
        if any(s.request_id == "bad" and s.draft_token_ids for s, _ in step.scheduled()):
            raise RuntimeError("injected verify failure")
        return original(step)

    engine.runner.run = run
    for i, prompt in enumerate(PROMPTS):
        engine.add_request("bad" if i == 1 else f"r{i}", m.tokenizer.encode(prompt), greedy())
    finals = {}
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert "injected verify failure" in finals["bad"].error
    assert [finals[f"r{i}"].outputs[0].token_ids for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    all_free(m)


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    m = tiny(speculative_config=spec(2))
    first = tokens_of(m.generate(PROMPTS, params))
    assert tokens_of(m.generate(PROMPTS, params)) == first
    assert tokens_of(m.generate(PROMPTS[::-1], params))[::-1] == first  # whatever else is in the batch


def test_disable_by_batch_size():
    m = tiny(speculative_config=spec(1, disable_by_batch_size=2))
    m.generate(PROMPTS, greedy())  # four at once: no drafts until two are left
    few = m.engine.stats().spec_decode.num_drafts
    m.generate(PROMPTS[:2], greedy())
    assert m.engine.stats().spec_decode.num_drafts > few


# ---- sampled output has the target's distribution ------------------------------------------------------

def chi_square_p(counts: Counter, probs: dict, n: int) -> float:
    """p-value of a chi-square goodness of fit; outcomes expected fewer than 5 times pooled into one bin."""
    big = [k for k, p in probs.items() if n * p >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expect = [n * probs[k] for k in big] + [n * (1 - sum(probs[k] for k in big))]
    chi = sum((o - e) ** 2 / e for o, e in zip(observed, expect, strict=True) if e > 0)
    return 1 - torch.special.gammainc(torch.tensor(len(big) / 2), torch.tensor(chi / 2)).item()


def test_rejection_sampler_keeps_the_target_distribution():
    """One position, a draft distribution q far from the target's p: the output must follow p. (Checked to
    fail, p-value 0 in float32, with the rejection's residual max(0, p - q) replaced by p.)"""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.3, 0.2])
    sampler = Sampler("cpu", seed=0)
    draws, n = Counter(), 3000
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        seq = Sequence("s", "s", 0, [0], 1, SamplingParams(temperature=1.0), 16)
        seq.draft_token_ids = [int(torch.multinomial(q, 1, generator=gen))]
        seq.draft_probs = q[None]
        tokens = _speculative_sample(torch.stack([p, p]), seq, sampler)
        draws[tokens[0]] += 1
    assert chi_square_p(draws, dict(enumerate(p.tolist())), n) > 1e-3


def target_distribution(model, prompt: list[int], length: int, temperature: float, top_k: int) -> dict:
    """The target's exact probability of every continuation of `length` tokens under temperature and top_k."""
    out = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, prob in out.items():
            logits = model.transformer.logits(torch.tensor([prompt + list(prefix)]))[0, -1] / temperature
            values, ids = logits.topk(top_k)
            for token, p in zip(ids.tolist(), values.softmax(-1).tolist(), strict=True):
                grown[prefix + (token,)] = prob * p
        out = grown
    return out


@pytest.mark.parametrize("k, n", [(1, 3000), pytest.param(2, 4000, marks=pytest.mark.exhaustive)])
def test_sampled_distribution_equals_the_target(k, n):
    """Three tokens (the second and third verified) from many unseeded requests against the target's exact
    joint distribution. The MTP head is scaled down so its drafts are often rejected (the guarantee holds
    for any drafter). Checked to fail (p ~ 1e-7) with the rejection's residual replaced by p."""
    m = tiny(speculative_config=spec(k), max_num_seqs=128, cache_tokens=16384)
    m.transformer.mtp[0].head = m.transformer.mtp[0].head * 0.5
    prompt, temperature, top_k, length = m.tokenizer.encode("x"), 3.0, 4, 3
    params = SamplingParams(max_tokens=length, temperature=temperature, top_k=top_k, ignore_eos=True)
    counts = Counter(tuple(o.outputs[0].token_ids) for o in m.generate([prompt] * n, params))
    stats = m.engine.stats().spec_decode
    assert stats.num_draft_tokens >= n and stats.num_accepted_tokens < 0.8 * stats.num_draft_tokens
    assert chi_square_p(counts, target_distribution(m, prompt, length, temperature, top_k), n) > 1e-3
    all_free(m)
