"""Generation: prefill each prompt into its cache row, then decode the batch one token at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dsv3.errors import Dsv3Error
from dsv3.model import Transformer


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are picked.

    Attributes:
        max_new_tokens: tokens to generate at most per prompt.
        temperature: 0 for greedy decoding, else softmax temperature.
        top_p: nucleus sampling threshold (1 keeps every token).
        seed: seed of the sampling generator (the same seed gives the same text).
        stop_ids: token ids that end a sequence (EOS).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise Dsv3Error(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise Dsv3Error(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Dsv3Error(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Pick one token per row of logits [B, V]: argmax, or temperature + top-p sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / params.temperature).softmax(dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Engine:
    """Batched generation over a model's preallocated latent cache."""

    def __init__(self, model: Transformer):
        self.model = model

    def check(self, prompts: list[list[int]], params: SamplingParams) -> None:
        m = self.model
        if not prompts:
            raise Dsv3Error("no prompts to generate from")
        if len(prompts) > m.max_batch_size:
            raise Dsv3Error(f"{len(prompts)} prompts exceed max_batch_size={m.max_batch_size}")
        for i, p in enumerate(prompts):
            if not p:
                raise Dsv3Error(f"prompt {i} is empty")
            if len(p) >= m.max_seq_len:
                raise Dsv3Error(f"prompt {i} has {len(p)} tokens; max_seq_len={m.max_seq_len} leaves no room to generate")
            bad = [t for t in p if not 0 <= t < m.config.vocab_size]
            if bad:
                raise Dsv3Error(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {m.config.vocab_size})")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Generate a continuation of each prompt.

        Args:
            prompts: token ids per prompt (lengths may differ).
            params: sampling settings.
            on_token: called with (prompt index, token) as each token is picked.
        Returns:
            The generated token ids per prompt (the stop token included when hit).
        """
        self.check(prompts, params)
        m = self.model
        device = m.backend.device
        generator = torch.Generator(device).manual_seed(params.seed)
        last = [m.prefill(torch.tensor([p], device=device), torch.tensor([i], device=device))[0, -1]
                for i, p in enumerate(prompts)]
        logits = torch.stack(last)
        slots = torch.arange(len(prompts), device=device)
        positions = torch.tensor([len(p) for p in prompts], device=device)
        stop = torch.tensor(params.stop_ids or [-1], device=device)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(params.max_new_tokens):
            tokens = sample(logits, params, generator)
            for i, (token, stopped) in enumerate(zip(tokens.tolist(), torch.isin(tokens, stop).tolist())):
                if done[i]:
                    continue
                outputs[i].append(token)
                if on_token:
                    on_token(i, token)
                done[i] = stopped or int(positions[i]) + 1 >= m.max_seq_len
            if all(done):
                break
            logits = m.decode(tokens, slots, positions)
            positions = (positions + 1).clamp(max=m.max_seq_len - 1)
        return outputs
