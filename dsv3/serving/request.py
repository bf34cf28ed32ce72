"""One sequence's state as it moves through the engine: tokens, cache blocks, progress, finish."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from dsv3.serving.params import SamplingParams
from dsv3.serving.structured import SequenceGrammar


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with n > 1 has n of them).

    Attributes:
        seq_id: unique in the engine ("<request_id>" or "<request_id>#<index>").
        request_id, index: the request and which of its completions.
        token_ids: prompt then generated tokens.
        num_prompt_tokens: the prompt's length.
        params: resolved sampling settings.
        num_computed_tokens: tokens whose latents are in the cache.
        block_table: the physical block of each logical block.
        block_hashes: chained content hashes of its full, computed blocks (prefix caching).
        num_cached_tokens: prompt tokens found in the prefix cache when it was first scheduled.
        generator: its own random generator when seeded.
        leader: for n > 1, completion 0, whose prompt blocks the others wait to share.
        group: who the scheduler shares slots fairly between (an HTTP request of several prompts is one);
            "" means its own request.
        draft_token_ids: tokens the speculative proposer guessed to follow token_ids, verified next step.
        draft_probs: float32 [len(draft_token_ids), V], the distributions they were drawn from (None: greedy).
        grammar: its structured-output matcher, if the request has a grammar (it never drafts).
        prompt_logprobs: per prompt token ({token: logprob} of the top `prompt_logprobs` and the prompt's own,
            the prompt token's rank), None for the first; filled as its prefill runs. None when not asked for.
    """

    seq_id: str
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_model_len: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int | None = None
    generator: torch.Generator | None = None
    leader: "Sequence | None" = None
    group: str = ""
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    grammar: "SequenceGrammar | None" = None
    prompt_logprobs: list[tuple[dict[int, float], int] | None] | None = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's log-probabilities are asked for (completion 0 of a request with prompt_logprobs)."""
        return self.prompt_logprobs is not None

    @property
    def fairness_key(self) -> str:
        return self.group or self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def token_at(self, position: int) -> int:
        """The token at `position`, the draft tokens counted as following token_ids."""
        n = len(self.token_ids)
        return self.token_ids[position] if position < n else self.draft_token_ids[position - n]

    def drop_drafts(self) -> None:
        self.draft_token_ids, self.draft_probs = [], None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Part of its prompt is not in the cache yet."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def max_tokens(self) -> int:
        """Tokens it may generate: max_tokens, and never past the context."""
        room = self.max_model_len - self.num_prompt_tokens
        return room if self.params.max_tokens is None else min(self.params.max_tokens, room)
