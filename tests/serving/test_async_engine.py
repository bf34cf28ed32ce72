"""AsyncEngine: streams, aborts that free blocks at once, no leak under random load."""

from __future__ import annotations

import asyncio
import random

import pytest
from serving_helpers import tiny

from dsv3.errors import EngineRequestError, RequestError
from dsv3.serving.async_engine import AsyncEngine
from dsv3.serving.params import SamplingParams


def check_free(engine: AsyncEngine) -> None:
    core = engine.loop.engine
    assert core.block_manager.check_all_free() == []
    assert not core.requests and not core.scheduler.has_work


def test_stream_abort_and_errors(model):
    engine: AsyncEngine = model.async_engine
    prompt = model.tokenizer.encode("Once upon a time")

    async def main():
        outputs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                                           ignore_eos=True), "s1")]
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert len(outputs[-1].outputs[0].token_ids) == 6

        stream = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), "long")
        first = await stream.__anext__()
        assert not first.finished
        await engine.abort("long")
        check_free(engine)  # the blocks are free once abort returns
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"

        with pytest.raises(RequestError) as error:
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=10_000), "too-long"):
                pass
        assert error.value.param == "max_tokens"
        with pytest.raises(RequestError):
            async for _ in engine.generate([5, 99_999], SamplingParams(), "oov"):
                pass

    asyncio.run(main())
    assert engine.stats().num_running == 0
    check_free(engine)


def test_a_consumer_that_goes_away_frees_its_blocks(model):
    engine = model.async_engine
    prompt = model.tokenizer.encode("The backend")

    async def main():
        async def consume():
            async for _ in engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                                           "gone"):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the abort is queued without waiting; the loop applies it before its next step
            if not engine.loop.engine.requests:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    check_free(engine)


def test_200_random_requests_with_random_cancels_leave_every_block_free():
    """Concurrency 32 through a cache small enough to preempt, prefix caching on, random cancels."""
    model = tiny(cache_tokens=384, max_num_seqs=32, max_num_batched_tokens=64)
    engine = model.async_engine
    vocab = model.config.vocab_size
    rng = random.Random(0)
    shared = [rng.randrange(2, vocab) for _ in range(40)]
    finished, cancelled = [], []

    async def one(i: int, gate: asyncio.Semaphore):
        async with gate:
            prompt = (shared[:rng.randrange(0, 40)] if rng.random() < 0.5 else []) + \
                [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=rng.choice([0.0, 1.0]),
                                    seed=rng.choice([None, i]), n=rng.choice([1, 1, 1, 2]))
            cancel_after = rng.randrange(1, 6) if rng.random() < 0.25 else None
            seen = 0
            async for output in engine.generate(prompt, params, f"r{i}"):
                seen += 1
                if cancel_after is not None and seen >= cancel_after and not output.finished:
                    await engine.abort(f"r{i}")
            (cancelled if output.outputs[0].finish_reason == "abort" else finished).append(i)
            assert output.finished

    async def main():
        gate = asyncio.Semaphore(32)
        await asyncio.gather(*[one(i, gate) for i in range(200)])

    try:
        asyncio.run(main())
        assert len(finished) + len(cancelled) == 200 and cancelled and finished
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_hits > 0
        check_free(engine)
    finally:
        model.shutdown()


def test_shutdown_fails_what_is_left_and_refuses_new_requests():
    model = tiny()
    engine = model.async_engine
    prompt = model.tokenizer.encode("Hello")

    async def main():
        stream = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), "x")
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineRequestError):
            async for _ in stream:
                pass
        with pytest.raises(EngineRequestError):
            async for _ in engine.generate(prompt, SamplingParams(), "y"):
                pass

    asyncio.run(main())
    check_free(engine)
