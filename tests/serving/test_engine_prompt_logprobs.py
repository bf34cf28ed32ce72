"""Prompt log-probabilities computed in the prefill: chunked, after a prefix-cache hit and through preemption,
against Model.logits over the whole prompt."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import tiny

from dsv3.serving.params import SamplingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog, and then the rest of it all",
           "DeepSeek-V3 runs on NVIDIA, AMD and Ascend chips from one codebase", "Once upon a time", "A"]


def check(model, prompt: list[int], prompt_logprobs, k: int) -> None:
    expected = model.logits(torch.tensor([prompt])).float().log_softmax(-1)[0]
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position, (values, rank) in enumerate(prompt_logprobs[1:], start=1):
        row = expected[position - 1]
        assert values[prompt[position]] == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        assert rank == int((row > row[prompt[position]]).sum()) + 1
        assert set(row.topk(k).indices.tolist()) <= set(values) and len(values) <= k + 1


def test_chunked_cached_and_preempted_prefills_give_the_whole_prompts_log_probs():
    m = tiny(max_num_batched_tokens=16, max_num_seqs=4, cache_tokens=96, max_model_len=96)  # chunks; preempts
    try:
        prompts = [m.tokenizer.encode(p) for p in PROMPTS]
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
        for _ in range(2):  # the second round finds the prompts in the prefix cache: recomputed, not skipped
            outputs = m.generate(prompts, params)
            for prompt, output in zip(prompts, outputs):
                check(m, prompt, output.prompt_logprobs, 3)
        assert m.engine.stats().num_preemptions > 0
        n = m.generate([prompts[0]], SamplingParams(max_tokens=2, n=2, temperature=1.0, prompt_logprobs=0))[0]
        check(m, prompts[0], n.prompt_logprobs, 0)
    finally:
        m.shutdown()
