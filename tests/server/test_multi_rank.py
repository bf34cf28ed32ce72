"""`dsv3 serve` over several ranks on the CPU (gloo): real server processes that start their own worker
ranks, driven by the openai client, against the one-process server with the same flags.

The engine settings make every guarantee happen: a cache of 10 blocks of 16 tokens for 12 concurrent
requests (preemption), prompts that share a prefix of two blocks (prefix-cache hits), a token budget of
32 (chunked prefill). fp32, so the ranks' partial sums cannot move a greedy token.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.distributed

FLAGS = ("--backend", "reference", "--precision", "fp32", "--max-model-len", "128", "--block-size", "16",
         "--cache-tokens", "160", "--max-num-batched-tokens", "32")
SHARED = "Once upon a time in a land far away, there lived a king who had three daughters and"
PROMPTS = [f"{SHARED} {i}" if i % 3 == 0 else f"Prompt {i}: the quick brown fox" + " jumps" * (i % 4)
           for i in range(12)]
MAX_TOKENS = 10


def start(*flags: str) -> ServerProcess:
    return ServerProcess(*FLAGS, *flags)


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def worker_pids(server: ServerProcess) -> list[int]:
    line = next(line for line in server.output().splitlines() if "started ranks" in line)
    return [int(pid) for pid in re.findall(r"pid (\d+)", line)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def outcomes(server: ServerProcess) -> dict:
    """Greedy and seeded completions of 12 concurrent requests, a cancelled stream, and what the engine
    counted meanwhile (preemptions, prefix-cache hits, blocks in use afterwards)."""
    c = client(server)

    def greedy(prompt: str):
        choice = c.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      logprobs=2).choices[0]
        return choice.text, choice.finish_reason, choice.logprobs.tokens, choice.logprobs.token_logprobs

    def seeded(i: int):
        return c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=1.0,
                                    top_p=0.9, seed=100 + i).choices[0].text

    with ThreadPoolExecutor(12) as pool:
        greedy_out = list(pool.map(greedy, PROMPTS))
        seeded_out = list(pool.map(seeded, range(6)))
    stream = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=60, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away: the server aborts the request and frees its blocks
    deadline = time.monotonic() + 30
    while (m := metrics(server))["dsv3:num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return dict(greedy=greedy_out, seeded=seeded_out, metrics=m)


@pytest.fixture(scope="module")
def one_process():
    server = start()
    try:
        yield outcomes(server)
    finally:
        server.stop()


def check_like_one_process(got: dict, want: dict) -> None:
    for (text, reason, tokens, logprobs), (want_text, want_reason, want_tokens, want_logprobs) in zip(
            got["greedy"], want["greedy"], strict=True):
        assert (text, reason, tokens) == (want_text, want_reason, want_tokens)
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert got["seeded"] == want["seeded"]
    m = got["metrics"]
    assert m["dsv3:num_preemptions_total"] > 0  # the small cache made the engine preempt
    assert m["dsv3:prefix_cache_hits_total"] > 0  # the shared prefix was found in the cache
    assert m["dsv3:num_requests_running"] == 0 and m["dsv3:kv_cache_usage_perc"] == 0  # every block free


@pytest.fixture(scope="module")
def tp2():
    server = start("--tensor-parallel-size", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dp2():
    server = start("--data-parallel-size", "2", "--enable-expert-parallel")
    yield server
    server.stop()


def test_tp2_serves_what_one_process_serves(one_process, tp2):
    assert len(worker_pids(tp2)) == 1
    check_like_one_process(outcomes(tp2), one_process)


def test_dp2_serves_what_one_process_serves(one_process, dp2):
    assert len(worker_pids(dp2)) == 1
    check_like_one_process(outcomes(dp2), one_process)


def used_blocks_while_four_run(server: ServerProcess) -> list[float]:
    """Blocks each DP group holds once four requests of two blocks each all hold both (a prompt of 17 tokens
    and 15 more: 32 tokens, two blocks of 16, from the end of the prefill to the end)."""
    c = client(server)
    prompts = [[100 + 20 * i + j for j in range(17)] for i in range(4)]  # no shared prefix
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(c.completions.create, model="tiny", prompt=p, max_tokens=15, temperature=0,
                               extra_body={"ignore_eos": True}) for p in prompts]
        seen = []
        while not seen and not all(f.done() for f in futures):
            m = httpx.get(f"{server.url}/metrics", timeout=10).text
            samples = [s for family in text_string_to_metric_families(m) for s in family.samples]
            used = [s.value for s in samples if s.name == "dsv3:kv_cache_used_blocks"]
            running = next(s.value for s in samples if s.name == "dsv3:num_requests_running")
            if running == 4 and sum(used) == 8:
                seen = used
        for f in futures:
            f.result()
    return seen


def test_dp2_holds_half_the_latent_cache_per_rank_that_tp2_does(tp2, dp2):
    assert used_blocks_while_four_run(tp2) == [8]  # every rank of the one TP group holds all eight blocks
    assert used_blocks_while_four_run(dp2) == [4, 4]  # each DP group (here one rank) its two requests' four


def test_sigterm_stops_every_rank(tp2, dp2):
    for server in (tp2, dp2):
        pids = worker_pids(server)
        assert all(alive(pid) for pid in pids)
        assert server.terminate() == 0
        assert not any(alive(pid) for pid in pids), server.output()


def test_a_killed_worker_fails_in_flight_requests_with_500_and_the_server_exits():
    server = start("-tp", "2")
    try:
        (pid,) = worker_pids(server)
        c = client(server)
        errors: list[BaseException] = []

        def request(i: int) -> None:
            try:
                c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=60, temperature=0,
                                     extra_body={"ignore_eos": True})
            except BaseException as e:  # noqa: BLE001 - each request's outcome is checked below
                errors.append(e)
        threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not metrics(server)["dsv3:num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, 9)
        killed = time.monotonic()
        for t in threads:
            t.join(60)
        assert len(errors) == 4 and all(isinstance(e, openai.InternalServerError) for e in errors), errors
        assert all("rank 1" in str(e) and "SIGKILL" in str(e) for e in errors), errors
        code = server.process.wait(30 - (time.monotonic() - killed))
        assert code != 0
        assert f"rank 1 (pid {pid}) was killed by signal SIGKILL" in server.output()
    finally:
        server.stop()


def test_a_layout_the_model_cannot_take_is_refused_before_any_rank_starts():
    result = subprocess.run([sys.executable, "-m", "dsv3", "serve", "--port", str(free_port()), "-tp", "3"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "has 4 attention heads (num_attention_heads), which 3 ranks cannot share evenly" in result.stderr
    assert "started ranks" not in result.stderr and "loaded" not in result.stderr


@pytest.mark.exhaustive
def test_two_nodes_meet_through_their_flags_and_stop_together(one_process):
    """--nnodes 2: node 1's command (here on the same machine) runs rank 1 and serves nothing; node 0 serves."""
    port = str(free_port())
    node = ("-tp", "2", "--nnodes", "2", "--master-port", port)
    same = ("--max-num-seqs", "16", *FLAGS)  # as ServerProcess gives node 0: every rank the same settings
    other = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", *same, *node, "--node-rank", "1"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server = start(*node, "--node-rank", "0")
        try:
            assert worker_pids(server) == []  # node 0 started no rank of its own: rank 1 is node 1's command
            c = client(server)
            got = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
            assert got.choices[0].text == one_process["greedy"][0][0]
            assert server.terminate() == 0
        finally:
            server.stop()
        assert other.wait(30) == 0, other.stdout.read()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


@pytest.mark.exhaustive
@pytest.mark.parametrize("flags", [("-tp", "4"), ("-dp", "2", "-tp", "2", "--enable-expert-parallel")],
                         ids=["tp4", "dp2xtp2"])
def test_more_ranks_serve_what_one_process_serves(one_process, flags):
    server = start(*flags)
    try:
        pids = worker_pids(server)
        check_like_one_process(outcomes(server), one_process)
        assert server.terminate() == 0
        assert not any(alive(pid) for pid in pids)
    finally:
        server.stop()
