"""Per-request sampling over a batch of logits, in batched tensor ops.

Order (as vLLM): penalties (repetition over prompt and output, presence and frequency over the
output), temperature, then top-k, top-p and min-p truncation, then a draw. Greedy rows take the
argmax of the penalized logits. A draw is the exponential race argmax(p / E) with E ~ Exp(1), which
picks token i with probability p_i; a seeded request draws its E from its own generator, so its
tokens do not depend on what else is in the batch. Log-probabilities are log_softmax of the
penalized, temperature-scaled logits (before truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.serving.request import Sequence


@dataclass
class SamplerOutput:
    """tokens: one per row; logprobs: per row {token: logprob} (top-k and the sampled) or None."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Samples the next token of each sequence.

    Args:
        device: where the logits are.
        seed: seed of the generator shared by unseeded requests.
    """

    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: float32 [S, V], row i for seqs[i]."""
        params = [s.params for s in seqs]
        if all(p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1 and not p.presence_penalty
               and not p.frequency_penalty for p in params):  # plain greedy (the common case): one pass
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(seqs))
        logits = logits.float()
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = finite(apply_penalties(logits, seqs))
        greedy = [p.temperature == 0 for p in params]
        if all(greedy) and not any(p.logprobs is not None for p in params):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(seqs))
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
        scaled = finite(logits / temperature[:, None])
        tokens = scaled.argmax(dim=-1)
        if not all(greedy):
            drawn = self._draw(truncate(scaled, params), seqs)
            tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens, drawn)
        return SamplerOutput(tokens.tolist(), self._logprobs(scaled, tokens, params))

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs)
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(shared) == len(seqs):
            race.exponential_(generator=self.generator)
        else:
            if shared:
                race[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
                    generator=self.generator)
            for i, seq in enumerate(seqs):
                if seq.generator is not None:
                    race[i].exponential_(generator=seq.generator)
        return (probs / race).argmax(dim=-1)

    @staticmethod
    def _logprobs(scaled: torch.Tensor, tokens: torch.Tensor, params) -> list[dict[int, float] | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        if not rows:
            return out
        logprobs = scaled[rows].log_softmax(dim=-1)
        k = max(params[i].logprobs for i in rows)
        top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
        picked = logprobs.gather(1, tokens[rows, None])[:, 0].tolist()
        top_values, top_ids, chosen = top_values.tolist(), top_ids.tolist(), tokens[rows].tolist()
        for j, i in enumerate(rows):
            n = params[i].logprobs
            entry = dict(zip(top_ids[j][:n], top_values[j][:n], strict=True))
            entry[chosen[j]] = picked[j]
            out[i] = entry
        return out


def finite(logits: torch.Tensor) -> torch.Tensor:
    """Logits a penalty or temperature pushed out of float range made finite again, so that softmax and
    log_softmax stay defined: +inf becomes the largest float, -inf and NaN (0 / 0) the lowest."""
    info = torch.finfo(logits.dtype)
    return logits.nan_to_num(nan=info.min, posinf=info.max, neginf=info.min)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple[dict[int, float], int]]:
    """Per row, ({token: logprob} of the top k and of the row's target, the target's rank with 1 the
    likeliest), from log_softmax of the raw logits, as vLLM returns prompt log-probabilities."""
    logprobs = logits.float().log_softmax(dim=-1)
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    picked = logprobs.gather(1, target)
    ranks = (logprobs > picked).sum(dim=-1).add(1).tolist()
    top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
    out = []
    for values, ids, token, value, rank in zip(top_values[:, :k].tolist(), top_ids[:, :k].tolist(), targets,
                                               picked[:, 0].tolist(), ranks):
        entry = dict(zip(ids, values))
        entry[token] = value
        out.append((entry, rank))
    return out


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens; presence and frequency over output tokens."""
    rows, vocab = logits.shape
    device = logits.device
    output_counts = torch.zeros(rows, vocab, device=device)
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
    for i, seq in enumerate(seqs):
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
        if out.numel():
            output_counts[i].index_add_(0, out, torch.ones(out.numel(), device=device))
        if seq.params.repetition_penalty != 1:
            seen[i, torch.tensor(seq.token_ids, dtype=torch.long, device=device)] = True
    repetition = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    frequency = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def truncate(logits: torch.Tensor, params) -> torch.Tensor:
    """Set to -inf what top_k, top_p and min_p leave out (each row its own settings)."""
    vocab = logits.shape[1]
    device = logits.device
    use_k = any(0 < p.top_k < vocab for p in params)
    use_p = any(p.top_p < 1 for p in params)
    if use_k or use_p:
        ordered, order = logits.sort(dim=-1, descending=True)
        if use_k:
            k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
            ordered = ordered.masked_fill(torch.arange(vocab, device=device)[None, :] >= k[:, None], float("-inf"))
        if use_p:
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            probs = ordered.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # probability of the likelier tokens
            ordered = ordered.masked_fill(before > top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, ordered)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits
