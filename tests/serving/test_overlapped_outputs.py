"""The engine thread launches step N+1 before it builds and delivers step N's outputs, and detokenizes
lazily where no stop string needs the text: every streamed output must still say what the plain,
one-step-at-a-time engine says after the same step (text, tokens, finish), stop strings included."""

from __future__ import annotations

import asyncio
import threading

from dsv3.serving.params import SamplingParams


def requests(model):
    prompts = ["Once upon a time", "The capital of France", "1 2 3 4", "Hello"]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[" the", "e"]),
              SamplingParams(max_tokens=17, temperature=0.8, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0)]
    return [(f"q{i}", model.tokenizer.encode(p), sp) for i, (p, sp) in enumerate(zip(prompts, params))]


def stepped(model, reqs):
    """Each request's outputs from LLMEngine.step, one step at a time, nothing overlapped."""
    engine = model.engine
    for request_id, prompt, params in reqs:
        engine.add_request(request_id, prompt, params)
    seen: dict[str, list] = {r: [] for r, _, _ in reqs}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    return seen


def summary(output):
    c = output.outputs[0]
    return c.text, c.token_ids, c.finish_reason, c.stop_reason, output.finished


def test_streamed_outputs_equal_the_stepped_engines(model):
    reqs = requests(model)
    want = {r: [summary(o) for o in outs] for r, outs in stepped(model, reqs).items()}

    async def main():
        async def one(request_id, prompt, params):
            return [summary(o) async for o in model.async_engine.generate(prompt, params, request_id + "a")]
        return await asyncio.gather(*(one(*r) for r in reqs))

    got = asyncio.run(main())
    for (request_id, _, _), outs in zip(reqs, got):
        assert outs == want[request_id], request_id
    for request_id, _, _ in reqs:
        final = want[request_id][-1]
        assert final[4]
        if request_id != "q1":
            assert final[0] == model.tokenizer.decode(final[1])


def test_an_eager_step_delivers_the_previous_outputs_before_its_forward(model):
    """On the CPU every step runs eagerly: a token must reach its caller before the next forward runs."""
    loop, runner = model.engine_loop, model.engine.runner
    assert not runner.graphs  # the reference backend records nothing: every step is eager
    delivered, seen_at_run = [], []
    real_run = runner.run

    def run(step):
        seen_at_run.append(len(delivered))
        return real_run(step)

    runner.run = run
    try:
        done = threading.Event()

        def sink(output):
            delivered.append(output)
            if output.finished:
                done.set()

        loop.submit("eager", model.tokenizer.encode("Hello"), SamplingParams(max_tokens=5, temperature=0.0,
                                                                             ignore_eos=True), sink)
        assert done.wait(60)
    finally:
        del runner.run
    assert len(delivered) == 5
    assert seen_at_run == [0, 1, 2, 3, 4]
