"""The Triton routing kernel (backends/triton_kernels/routing.py) against dsv3.backends.reference.route_experts.

Every DeepSeek routing (V3 noaux_tc with its correction bias, V2 group_limited_greedy, V2-Lite greedy,
the tiny config) for 1, 5 and 64 tokens, the no-group variants, and two cases built so that a wrong
rule picks other experts: a group whose one huge expert would win under "group score = max" but
loses under V3's top-2 sum, and a bias that moves the choice (and a group) away from the unbiased
scores while the weights stay unbiased. Ids must be equal, weights equal to float32 rounding.

On the CPU the kernel runs under TRITON_INTERPRET=1, set in a subprocess before triton is imported;
on an NVIDIA GPU the same checks run compiled, and a CUDA graph capture is replayed with new logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsv3.backends.interface import RoutingConfig
from dsv3.backends.reference import route_experts

from tests.run_helpers import check_ran, run_python

pytest.importorskip("triton")

#: (experts, routing) of each DeepSeek generation, from the released configs.
V3 = (256, RoutingConfig("sigmoid", "noaux_tc", 8, 8, 4, True, 2.5))
V2 = (160, RoutingConfig("softmax", "group_limited_greedy", 6, 8, 3, False, 16.0))
V2_LITE = (64, RoutingConfig("softmax", "greedy", 6, 1, 1, False, 1.0))

#: relative error allowed on the weights (the reference computes them in float32 too).
TOLERANCES = {"cpu": 1e-6, "cuda": 1e-6}


def tiny() -> tuple[int, RoutingConfig]:
    from dsv3.config import load_config

    c = load_config("tiny")
    return c.n_routed_experts, RoutingConfig(c.scoring_func, c.topk_method, c.num_experts_per_tok, c.n_group,
                                             c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)


def check(logits: torch.Tensor, bias: torch.Tensor | None, config: RoutingConfig, case: str) -> torch.Tensor:
    """route() equals route_experts(): ids exactly, weights to TOLERANCES. Returns the ids."""
    from dsv3.backends.triton_kernels.routing import route

    weights, ids = route(logits, bias, config)
    expected_weights, expected_ids = route_experts(logits, bias, config)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32, case
    assert ids.shape == weights.shape == (logits.shape[0], config.top_k), case
    assert torch.equal(ids, expected_ids), f"{case}: ids\n{ids}\n!=\n{expected_ids}"
    torch.testing.assert_close(weights, expected_weights, rtol=TOLERANCES[logits.device.type], atol=0, msg=case)
    return ids


def top2_trap(num_experts: int, config: RoutingConfig, generator: torch.Generator) -> torch.Tensor:
    """Two tokens whose trap group (the first, then the last) holds the best expert but a weak second:
    noaux_tc must drop it for topk_groups groups with two good experts each."""
    groups, size = config.num_groups, num_experts // config.num_groups
    logits = torch.randn(2, num_experts, generator=generator) * 0.01 - 4.0
    for token, trap in ((0, 0), (1, groups - 1)):
        row = logits[token].view(groups, size)
        row[trap, size // 2] = 8.0  # sigmoid 0.9997 + about 0.018 for the group's second best
        good = [g for g in range(groups) if g != trap][:config.topk_groups]
        for i, g in enumerate(good):  # two of sigmoid(1) = 0.73: a group sum of about 1.46
            row[g, 0], row[g, size - 1] = 1.0 + 0.01 * i, 1.005 + 0.01 * i
    return logits


def check_all(device: str) -> None:
    """Every case on one device; run in-process on a GPU, in the interpreter's subprocess on the CPU."""
    from dsv3.backends.triton_kernels import routing

    g = torch.Generator().manual_seed(0)
    tiny_experts, tiny_config = tiny()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    generations = (("V3", V3, True), ("V2", V2, False), ("V2-Lite", V2_LITE, False),
                   ("tiny", (tiny_experts, tiny_config), True))
    for name, (num_experts, config), with_bias in generations:
        bias = rand(num_experts, scale=0.05) if with_bias else None
        for tokens in (1, 5, 64):
            check(rand(tokens, num_experts), bias, config, f"{name}, {tokens} tokens")

    # no group step: greedy with groups configured, noaux_tc with one group; logits with a row stride > E
    num_experts, config = V3
    logits = rand(5, num_experts + 32)[:, :num_experts]
    check(logits, None, dataclasses.replace(config, method="greedy", scoring="softmax"), "greedy, 8 groups")
    one_group = dataclasses.replace(config, num_groups=1, topk_groups=1)
    check(logits, rand(num_experts, scale=0.05), one_group, "noaux_tc, 1 group")

    for name, (num_experts, config) in (("V3", V3), ("tiny", (tiny_experts, tiny_config))):
        # the top-2 sum: the trap group's huge expert wins under max and loses under noaux_tc
        logits = top2_trap(num_experts, config, g).to(device)
        size = num_experts // config.num_groups
        trapped = torch.tensor([size // 2, num_experts - size + size // 2], device=device)
        ids = check(logits, None, config, f"{name}, top-2 trap")
        assert not (ids == trapped[:, None]).any(dim=1).any(), f"{name}: the trap group was kept"
        by_max = route_experts(logits, None, dataclasses.replace(config, method="group_limited_greedy"))[1]
        assert (by_max == trapped[:, None]).any(dim=1).all(), f"{name}: the trap does not test the top-2 sum"

        # the bias: +1 on the two first experts of the last group (the group and both experts always win),
        # -1 on expert 0 (never chosen); the weights are the small unbiased scores of the pushed experts
        bias = rand(num_experts, scale=0.001)
        pushed = num_experts - size
        bias[pushed:pushed + 2] = 1.0
        bias[0] = -1.0
        logits = rand(4, num_experts) - 2.0
        logits[:, 0] = 6.0
        ids = check(logits, bias, config, f"{name}, bias")
        assert (ids == pushed).any(dim=1).all() and (ids == pushed + 1).any(dim=1).all() and (ids != 0).all(), name
        assert not torch.equal(ids, route_experts(logits, None, config)[1]), f"{name}: the bias changes nothing"

    # exact ties (equal logits): torch.topk's order is unspecified; the kernel takes the lowest ids first
    num_experts, config = V2_LITE
    weights, ids = routing.route(torch.zeros(2, num_experts, device=device), None, config)
    assert torch.equal(ids, torch.arange(config.top_k, device=device).expand(2, -1)), ids
    assert torch.equal(weights, torch.full_like(weights, 1 / num_experts)), weights

    # a NaN token: distinct experts (NaN ranks first, as in torch.topk), NaN weights, other tokens untouched
    for name, (num_experts, config), with_bias in generations:
        logits = rand(4, num_experts)
        logits[2, 3] = float("nan")
        if config.scoring == "sigmoid":
            logits[2] = float("nan")  # sigmoid keeps other lanes finite: poison the whole token
        bias = rand(num_experts, scale=0.05) if with_bias else None
        weights, ids = routing.route(logits, bias, config)
        expected_weights, expected_ids = route_experts(logits, bias, config)
        assert ids[2].unique().numel() == config.top_k and weights[2].isnan().all(), (name, ids[2], weights[2])
        rows = [0, 1, 3]
        assert torch.equal(ids[rows], expected_ids[rows]), name
        torch.testing.assert_close(weights[rows], expected_weights[rows], rtol=TOLERANCES[device], atol=0)

    # cases the kernel leaves to the reference (same results, whatever the device)
    many = (2048, RoutingConfig("softmax", "greedy", 8, 1, 1, False, 1.0))
    few_kept = (64, RoutingConfig("sigmoid", "noaux_tc", 40, 8, 4, True, 2.5))  # 40 > 4 groups x 8 experts
    for num_experts, config in (many, few_kept):
        assert routing._grouping(num_experts, config) is None
        check(rand(3, num_experts), None, config, f"fallback {num_experts} experts, top_k {config.top_k}")


@pytest.mark.emulated
def test_route_under_triton_interpreter():
    code = f"import runpy; runpy.run_path({__file__!r})['check_all']('cpu'); print('routing ok')"
    check_ran(run_python(code, interpret=True), "routing ok")


# ---- NVIDIA GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.cuda
def test_route_on_gpu():
    check_all("cuda")
    num_experts, config = V3  # a prefill batch
    g = torch.Generator("cuda").manual_seed(1)
    bias = torch.randn(num_experts, device="cuda", generator=g) * 0.05
    check(torch.randn(4096, num_experts, device="cuda", generator=g), bias, config, "V3, 4096 tokens")


@pytest.mark.gpu
@pytest.mark.cuda
def test_route_cuda_graph_replay():
    """Captured once, replayed with new logits: the reference's routing of the new logits."""
    from dsv3.backends.triton_kernels.routing import route

    num_experts, config = V3
    g = torch.Generator("cuda").manual_seed(2)
    bias = torch.randn(num_experts, device="cuda", generator=g) * 0.05
    logits = torch.randn(8, num_experts, device="cuda", generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        route(logits, bias, config)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(logits, bias, config)
    for _ in range(3):
        logits.copy_(torch.randn(8, num_experts, device="cuda", generator=g))
        graph.replay()
        expected_weights, expected_ids = route_experts(logits, bias, config)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights, expected_weights, rtol=TOLERANCES["cuda"], atol=0)
