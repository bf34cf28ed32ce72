"""Prompt log-probabilities through a real `dsv3 serve`: lm-evaluation-harness's loglikelihood requests and
vLLM's `prompt_logprobs`, against scoring with Model.logits in this process.

lm-eval itself is not installed (it pulls datasets, pandas, pyarrow, scikit-learn...): the requests below are
exactly what its `local-completions` model sends for a loglikelihood (multiple-choice) task: token-id prompts
in one batch, `echo: true`, `logprobs: 1`, `max_tokens: 1`, `temperature: 0`; and its answer is read as
lm-eval's `parse_logprobs` reads it: the sum of `token_logprobs[ctxlen:-1]`, greedy when each is its top's max.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import API_KEY

import dsv3

AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: a local multiple-choice task: (context, choices)
TASK = [("The capital of France is", [" Paris", " Berlin", " a large fish"]),
        ("Two plus two equals", [" four", " five"]),
        ("DeepSeek-V3 runs on NVIDIA, AMD and Ascend chips from one codebase, and its attention is", [" MLA", " RNN"])]


@pytest.fixture(scope="module")
def model():
    m = dsv3.load_model(None, quiet=True, max_model_len=512, cache_tokens=4096)  # the server's settings
    yield m
    m.shutdown()


def lm_eval_requests(model):
    """(context+continuation ids, ctxlen) per choice, tokenized as lm-eval does: context and continuation apart."""
    requests = []
    for context, choices in TASK:
        ctx = model.tokenizer.encode(context)
        for choice in choices:
            requests.append((ctx + model.tokenizer.encode(choice, add_bos=False), len(ctx)))
    return requests


def scored_by_model(model, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    logprobs = model.logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    picked = [logprobs[i - 1, ids[i]] for i in range(ctxlen, len(ids))]
    greedy = all(logprobs[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
    return float(sum(picked)), greedy


def lm_eval_loglikelihood(server, requests) -> list[tuple[float, bool]]:
    payload = {"model": "tiny", "prompt": [ids for ids, _ in requests], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(f"{server.url}/v1/completions", json=payload, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    results = []
    for choice, (ids, ctxlen) in zip(sorted(response.json()["choices"], key=lambda c: c["index"]), requests):
        token_logprobs = choice["logprobs"]["token_logprobs"]
        assert len(token_logprobs) == len(ids) + 1 and token_logprobs[0] is None
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        results.append((sum(token_logprobs[ctxlen:-1]),
                        all(t == max(top.values()) for t, top in zip(token_logprobs[ctxlen:-1], tops))))
    return results


def test_lm_eval_loglikelihood_matches_model_logits_twice(server, model):
    requests = lm_eval_requests(model)
    expected = [scored_by_model(model, ids, ctxlen) for ids, ctxlen in requests]
    for _ in range(2):  # the second time the prompts sit in the prefix cache: their log-probs are recomputed
        got = lm_eval_loglikelihood(server, requests)
        for (value, greedy), (want, want_greedy) in zip(got, expected):
            assert value == pytest.approx(want, abs=0.05 + 0.01 * abs(want))
            assert greedy == want_greedy
    # the task's answers: the same choice wins by either scoring
    start = 0
    for _, choices in TASK:
        span = slice(start, start + len(choices))
        assert max(range(len(choices)), key=lambda i: got[span][i][0]) == \
            max(range(len(choices)), key=lambda i: expected[span][i][0])
        start += len(choices)


def test_vllms_prompt_logprobs_on_completions_chat_and_a_stream(server, model):
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    choice = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]
    prompt_logprobs = choice["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    logprobs = model.logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        own = entry[str(ids[position])]
        assert own["logprob"] == pytest.approx(logprobs[position - 1, ids[position]].item(), abs=0.05)
        assert own["rank"] >= 1 and 2 <= len(entry) <= 3
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    import json
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["prompt_logprobs"] == prompt_logprobs
    assert all(c["choices"][0].get("prompt_logprobs") is None for c in chunks[1:])
    chat = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0})
    chat_logprobs = chat.json()["prompt_logprobs"]
    assert chat_logprobs[0] is None and all(len(e) == 1 for e in chat_logprobs[1:])
