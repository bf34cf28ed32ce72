"""The engine's guarantees on the tiny checkpoint (reference backend, fp32).

Greedy output is the same alone, batched with other lengths, after preemption and from the prefix
cache; seeded sampling is the same whatever else runs; stop strings; bad requests fail alone; a
failure inside one request fails only it; every block comes back.
"""

from __future__ import annotations

import threading

import pytest
import torch
from serving_helpers import tiny

from dsv3.errors import EngineRequestError, RequestError
from dsv3.serving.params import SamplingParams

PROMPTS = ["Once upon a time", "The backend of the model is", "A", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend "
           "chips from one codebase, and this tiny model learned"]


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def ids(model, texts):
    return [model.tokenizer.encode(t) for t in texts]


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_free(model):
    assert model.engine.block_manager.check_all_free() == []
    assert not model.engine.requests and not model.engine.scheduler.has_work


def assert_fails_alone(model, alone, good: int, bad: int, request_id: str, error: str) -> None:
    """PROMPTS[bad] sent as `request_id` fails with `error` while PROMPTS[good], streamed beside it from another
    thread, gets what it gets alone; every block comes back."""
    loop = model.engine_loop
    out = {}
    thread = threading.Thread(target=lambda: out.update(tokens=list(loop.stream(ids(model, PROMPTS[good:good + 1])[0],
                                                                                greedy()))))
    thread.start()
    with pytest.raises(EngineRequestError, match=error):
        list(loop.stream(ids(model, PROMPTS[bad:bad + 1])[0], greedy(), request_id=request_id))
    thread.join()
    assert out["tokens"][-1].outputs[0].token_ids == alone[good]
    assert_all_free(model)


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy tokens, run on its own."""
    return [model.generate(p, greedy())[0].outputs[0].token_ids for p in PROMPTS]


def test_greedy_alone_equals_recomputing_the_whole_sequence(model, alone):
    prompt = model.tokenizer.encode(PROMPTS[1])
    sequence = list(prompt)
    for _ in range(len(alone[1])):
        sequence.append(int(model.logits(torch.tensor([sequence]))[0, -1].argmax()))
    assert sequence[len(prompt):] == alone[1]


def test_batched_with_other_lengths_and_chunked_prefill_changes_nothing(alone):
    m = tiny(max_num_batched_tokens=8, max_num_seqs=4)  # prompts in chunks, mixed with the others' decodes
    try:
        outputs = m.generate(PROMPTS, greedy())
        assert tokens_of(outputs) == alone
        assert len({tuple(a) for a in alone}) == len(alone)  # the prompts really lead to different text
        assert_all_free(m)
    finally:
        m.shutdown()


def test_preempted_requests_resume_with_the_same_output(alone):
    # 6 blocks of 16 for four requests of up to 44 tokens: not enough for all at once
    m = tiny(cache_tokens=96, max_model_len=96, enable_prefix_caching=False)
    try:
        outputs = m.generate(PROMPTS, greedy())
        stats = m.engine.stats()
        assert stats.num_preemptions > 0
        assert tokens_of(outputs) == alone
        assert stats.generation_tokens == sum(map(len, alone))  # resumed, not generated again from the prompt
        assert_all_free(m)
    finally:
        m.shutdown()


def test_prefix_cache_hit_gives_the_same_output(model):
    long_prompt = model.tokenizer.encode(PROMPTS[3] + " many pages of text about latent attention")
    first = model.generate([long_prompt], greedy())[0]
    hits = model.engine.stats().prefix_hits
    again = model.generate([long_prompt], greedy())[0]
    assert again.num_cached_tokens >= 16 and model.engine.stats().prefix_hits - hits == again.num_cached_tokens
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    off = tiny(enable_prefix_caching=False)
    try:
        assert off.generate([long_prompt], greedy())[0].outputs[0].token_ids == first.outputs[0].token_ids
    finally:
        off.shutdown()
    assert_all_free(model)


def test_seeded_sampling_is_the_same_whatever_else_is_batched(model):
    hot = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    alone = model.generate(PROMPTS[0], hot)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.7, seed=5, ignore_eos=True), greedy()]
    batched = model.generate(PROMPTS[1:] + PROMPTS[:1], others + [hot])
    assert batched[-1].outputs[0].token_ids == alone
    assert model.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=1.5, seed=99, ignore_eos=True)
                          )[0].outputs[0].token_ids != alone
    assert alone != model.generate(PROMPTS[0], greedy(16))[0].outputs[0].token_ids  # really sampled


def test_n_completions_share_the_prompt(model):
    out = model.generate(PROMPTS[3], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy_n = model.generate(PROMPTS[3], SamplingParams(n=2, max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert greedy_n.outputs[0].token_ids == greedy_n.outputs[1].token_ids
    assert_all_free(model)


def test_stop_string_ends_the_text_before_it(model, alone):
    full = model.generate(PROMPTS[1], greedy())[0].outputs[0]
    stop = full.text[5:9]
    assert stop.strip()
    out = model.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                    stop=[stop]))[0].outputs[0]
    assert out.text == full.text[:full.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_token_and_length(model, alone):
    stop_token = alone[0][3]
    out = model.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=[stop_token]))[0].outputs[0]
    assert out.token_ids == alone[0][:alone[0].index(stop_token) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)
    out = model.generate(PROMPTS[0], greedy(5))[0].outputs[0]
    assert (out.finish_reason, out.token_ids) == ("length", alone[0][:5])


def test_logprobs_hold_the_top_k_and_the_sampled_token(model, alone):
    out = model.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                    logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and len(entry) == 3 and max(entry, key=entry.get) == token
        assert all(v <= 0 for v in entry.values())


@pytest.mark.parametrize("prompt, params, param", [
    ([5] * 256, greedy(1), "prompt"),
    ([5] * 200, greedy(57), "max_tokens"),
    ([5, 512], greedy(1), "prompt"),
    ([], greedy(1), "prompt"),
    ([5, -3], greedy(1), "prompt"),
    ([5, 6], SamplingParams(stop_token_ids=[600]), "stop_token_ids"),
])
def test_bad_requests_fail_before_any_work_and_alone(model, alone, prompt, params, param):
    results = {}

    def other():
        results["other"] = model.generate(PROMPTS[0], greedy())[0].outputs[0].token_ids

    thread = threading.Thread(target=other)
    thread.start()
    with pytest.raises(RequestError) as error:
        model.generate([prompt], params)
    thread.join()
    assert error.value.param == param and "\n" not in str(error.value)
    assert results["other"] == alone[0]
    assert_all_free(model)


def test_threads_share_one_engine_and_get_what_each_gets_alone(model, alone):
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        results[i] = model.generate(PROMPTS[i], greedy())[0].outputs[0].token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == alone


def test_a_failing_sampler_fails_only_its_request(model, alone, monkeypatch):
    engine = model.engine
    original = type(engine.sampler).__call__

    def sampler(self, logits, seqs):
        if any(s.request_id.endswith("poison") for s in seqs):
            raise RuntimeError("injected sampler failure")
        return original(self, logits, seqs)

    monkeypatch.setattr(type(engine.sampler), "__call__", sampler)
    assert_fails_alone(model, alone, good=0, bad=1, request_id="x-poison", error="injected sampler failure")


def test_a_failing_forward_fails_only_its_request(model, alone, monkeypatch):
    runner = model.engine.runner
    original = runner.run

    def run(step):
        if any(s.request_id == "bad-forward" for s, _ in step.scheduled()):
            raise RuntimeError("injected forward failure")
        return original(step)

    monkeypatch.setattr(runner, "run", run)
    assert_fails_alone(model, alone, good=2, bad=1, request_id="bad-forward", error="injected forward failure")


def test_streamed_outputs_are_cumulative_and_end_finished(model, alone):
    outputs = list(model.generate_stream(PROMPTS[0], greedy()))
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert all(a == b[:len(a)] for a, b in zip(tokens, tokens[1:], strict=False))
    assert tokens[-1] == alone[0]
    assert outputs[-1].metrics.first_token_time >= outputs[-1].metrics.arrival_time


def test_cache_too_small_for_one_request_names_the_setting():
    with pytest.raises(Exception, match="raise cache_tokens or lower max_model_len"):
        tiny(cache_tokens=64, max_model_len=256)


def test_a_string_is_one_prompt_and_token_lists_are_prompts(model, alone):
    """Issue 18: Model.generate("a string") is one prompt, never one per character."""
    (one,) = model.generate(PROMPTS[0], greedy(3))
    assert one.prompt_token_ids == model.tokenizer.encode(PROMPTS[0]) and one.outputs[0].token_ids == alone[0][:3]
    assert len(model.generate(model.tokenizer.encode(PROMPTS[0]), greedy(3))) == 1  # a list of ids: one prompt
    assert len(model.generate(ids(model, PROMPTS), greedy(3))) == len(PROMPTS)
    with pytest.raises(RequestError, match="one prompt"):
        next(model.generate_stream(PROMPTS, greedy(3)))


def test_the_engine_names_a_request_too_long_for_its_context(model):
    """LLMEngine.check_request is the one owner of request checks: this is the message the server's 400 carries
    (tests/server/test_serve.py)."""
    n = model.max_model_len
    with pytest.raises(RequestError, match=rf"^this model's context is {n} tokens, but {n + 3} were requested \(3 in "
                                           rf"the prompt, {n} to generate\): lower max_tokens to at most {n - 3}$"):
        model.generate([[5, 6, 7]], SamplingParams(max_tokens=n))
    with pytest.raises(RequestError, match=f"^the prompt is {n} tokens, and this model's context is {n} tokens"):
        model.generate([[5] * n], SamplingParams(max_tokens=1))


def test_fail_ends_one_request_with_its_error_and_frees_its_blocks():
    model = tiny(cache_tokens=256, max_model_len=64)
    engine = model.engine  # stepped here, without the engine loop's thread
    engine.add_request("doomed", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0))
    engine.add_request("kept", [8, 9], SamplingParams(max_tokens=2, temperature=0.0))
    engine.step()
    output = engine.fail("doomed", RuntimeError("the device went away"))
    assert output.finished and output.error == "request doomed failed: RuntimeError: the device went away"
    assert engine.fail("doomed", RuntimeError("again")) is None and set(engine.requests) == {"kept"}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    model.shutdown()
