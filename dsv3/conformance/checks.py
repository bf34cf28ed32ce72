"""How a conformance case's output is checked against the reference's: row_error, and the
"close", "logits", "propagate", "route" (with routing_margins) and "greedy" checks (CHECKS).
"""

from __future__ import annotations

import torch

from dsv3.backends.interface import RoutingConfig
from dsv3.conformance.suite import Greedy, Tolerance


class Mismatch(Exception):
    """An output of the wrong shape or dtype (reported as the failure)."""


def _tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)


def _same_layout(got: torch.Tensor, expected: torch.Tensor) -> None:
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"returned {type(got).__name__}, expected a tensor")
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise Mismatch(f"returned {got.dtype} {list(got.shape)}, expected {expected.dtype} {list(expected.shape)}")


def row_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Max over rows of max|got - expected| / max|expected| in the row (non-finite got counts as inf)."""
    g, e = _rows(got).to(expected.device), _rows(expected)
    if e.numel() == 0:
        return 0.0
    diff = torch.where(torch.isfinite(g), (g - e).abs(), torch.full_like(g, float("inf")))
    floor = max(e.abs().max().item() * 1e-6, 1e-30)
    return (diff.amax(-1) / e.abs().amax(-1).clamp_min(floor)).max().item()


def check_close(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    got, expected = _tuple(got), _tuple(expected)
    if len(got) != len(expected):
        raise Mismatch(f"returned {len(got)} outputs, expected {len(expected)}")
    for e in expected:
        if not torch.isfinite(e.float()).all():
            return False, None, "suite error: the reference output is not finite"
    for g, e in zip(got, expected):
        _same_layout(g, e)
    error = max(row_error(g, e) for g, e in zip(got, expected))
    return error <= tol.error, error, ""


def check_logits(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    """Model logits at a rounding precision: within the tolerance of the reference at that precision, or,
    where the model amplifies rounding (expert choices flip on near-ties), no farther from the exact
    fp32 logits than the reference itself is (x1.25 + the tolerance). A wrong result fails both."""
    ok, error, _ = check_close(got, expected, inp, tol)
    if ok:
        return ok, error, ""
    own, ours = row_error(expected, inp["exact"]), row_error(got, inp["exact"])
    note = f"reference is {own:.1e} from exact fp32, backend {ours:.1e}"
    return ours <= 1.25 * own + tol.error, error, note


def check_propagate(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    got, expected = _tuple(got), _tuple(expected)
    if len(got) != len(expected):
        raise Mismatch(f"returned {len(got)} outputs, expected {len(expected)}")
    poisoned = inp["poisoned"].reshape(-1).to(expected[0].device)
    error = 0.0
    for g, e in zip(got, expected):
        _same_layout(g, e)
        er, gr = _rows(e), _rows(g)
        if not torch.equal(~torch.isfinite(er).all(-1), poisoned):
            return False, None, "suite error: the reference does not propagate exactly to the poisoned rows"
        bad = ~torch.isfinite(gr).all(-1)
        if (poisoned & ~bad).any():
            swallowed = int((poisoned & ~bad).sum())
            return False, None, f"{swallowed} of {int(poisoned.sum())} rows fed a NaN/inf came out finite"
        if (bad & ~poisoned).any():
            return False, None, f"{int((bad & ~poisoned).sum())} rows not fed a NaN/inf came out non-finite"
        error = max(error, row_error(gr[~poisoned], er[~poisoned]))
    return error <= tol.error, error, f"{int(poisoned.sum())} poisoned rows non-finite, the other rows finite"


def routing_margins(logits: torch.Tensor, bias: torch.Tensor | None, config: RoutingConfig) -> torch.Tensor:
    """Per token [N], how far the reference's choice is from a tie, relative to the scores involved:
    the gap between the last kept and the first dropped group, and between the k-th and (k+1)-th expert."""
    scores = logits.sigmoid() if config.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    margin = torch.full(choice.shape[:1], float("inf"), device=choice.device)
    if config.method in ("noaux_tc", "group_limited_greedy") and config.num_groups > 1:
        grouped = choice.view(choice.shape[0], config.num_groups, -1)
        group_scores = grouped.topk(2, -1).values.sum(-1) if config.method == "noaux_tc" else grouped.amax(-1)
        if config.topk_groups < config.num_groups:
            top = group_scores.topk(config.topk_groups + 1, -1).values
            margin = (top[:, -2] - top[:, -1]) / top[:, -2].abs().clamp_min(1e-30)
        kept = group_scores.topk(config.topk_groups, -1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~mask[..., None], float("-inf")).flatten(1)
    k = config.top_k
    if k < choice.shape[1]:
        top = choice.topk(k + 1, -1).values
        margin = torch.minimum(margin, (top[:, k - 1] - top[:, k]) / top[:, k - 1].abs().clamp_min(1e-30))
    return margin


def check_route(got, expected, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    (weights, ids), (ref_weights, ref_ids) = _tuple(got), _tuple(expected)
    _same_layout(weights, ref_weights)
    _same_layout(ids, ref_ids)
    num_experts = inp["gate_weight"].shape[0]
    if ((ids < 0) | (ids >= num_experts)).any():
        return False, None, f"expert ids outside [0, {num_experts})"
    ids_sorted, order = ids.sort(-1)
    if (ids_sorted[:, 1:] == ids_sorted[:, :-1]).any():
        return False, None, "a token picked the same expert twice"
    ref_sorted, ref_order = ref_ids.sort(-1)
    clean = ~inp["poisoned"].to(ids.device) if "poisoned" in inp else torch.ones(len(ids), dtype=torch.bool,
                                                                                 device=ids.device)
    logits = torch.nn.functional.linear(inp["x"].float(), inp["gate_weight"].float())
    decided = clean & (routing_margins(logits, inp["bias"], inp["config"]) > tol.tie)
    same = (ids_sorted == ref_sorted).all(-1)
    wrong = decided & ~same
    if wrong.any():
        t = int(wrong.nonzero()[0])
        return False, None, (f"{int(wrong.sum())} of {int(decided.sum())} tokens picked other experts "
                             f"(token {t}: {ids_sorted[t].tolist()}, reference {ref_sorted[t].tolist()})")
    compared = clean & same
    error = row_error(weights.gather(1, order)[compared], ref_weights.gather(1, ref_order)[compared])
    ties = int((clean & ~decided).sum())
    return error <= tol.error, error, f"{ties} near-tie tokens not compared" if ties else ""


def check_greedy(got: Greedy, expected: Greedy, inp, tol: Tolerance) -> tuple[bool, float | None, str]:
    notes = []
    for i, (prompt, tokens, ref_tokens) in enumerate(zip(expected.prompts, got.tokens, expected.tokens)):
        if tokens == ref_tokens:
            continue
        shared = min(len(tokens), len(ref_tokens))
        step = next((j for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), shared)
        if step >= shared:
            return False, None, f"prompt {i}: {len(tokens)} tokens generated, reference {len(ref_tokens)}"
        logits = expected.model.logits(torch.tensor([prompt + ref_tokens[:step]]))[0, -1]
        margin = ((logits[ref_tokens[step]] - logits[tokens[step]]) / logits.abs().max()).item()
        if margin > tol.error:
            return False, margin, (f"prompt {i}: token {step} is {tokens[step]}, reference {ref_tokens[step]} "
                                   f"(reference logit margin {margin:.1e}, not a near-tie)")
        notes.append(f"prompt {i} diverged at token {step} on a near-tie ({margin:.1e})")
    return True, 0.0, "; ".join(notes) or "same tokens"


CHECKS = {"close": check_close, "logits": check_logits, "propagate": check_propagate, "route": check_route,
          "greedy": check_greedy}
