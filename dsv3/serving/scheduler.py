"""Who runs each step: running sequences first, then waiting ones, under a token budget.

One step function, no separate prefill and decode phases (vLLM v1's shape). Each step:
1. Every running sequence gets its next tokens, in admission order: one token when it is decoding
   (with its draft tokens where speculative decoding proposed some, a chunk the model verifies), else
   the next chunk of its prompt, as far as the budget (`max_num_batched_tokens`) goes. When the
   cache has no block left for it, the newest running sequence is preempted: its blocks are freed and
   it goes back to the front of the queue, to be recomputed from its tokens later (greedy output is
   unchanged: the recomputed cache holds what the original did).
2. If nothing was preempted, waiting sequences are admitted while the budget, the blocks and
   `max_num_seqs` allow, those of the request with the fewest running sequences first (in arrival
   order among equals); each starts after the longest prefix found in the prefix cache.
Fair across requests: one request's many sequences (a list of prompts, n > 1) cannot hold every slot
while another request waits. Where all `max_num_seqs` slots are taken and a request with none waits,
the newest sequence of the request running the most is sent back to the queue to make room.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from dsv3.serving.block_manager import BlockManager
from dsv3.serving.request import Sequence, Status


@dataclass
class ScheduledStep:
    """What one step runs.

    Attributes:
        decodes: sequences that run one token (their last; position num_computed_tokens).
        prefills: (sequence, number of tokens) that run a chunk of several tokens.
        preempted: sequences sent back to the queue this step.
    """

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    def scheduled(self) -> list[tuple[Sequence, int]]:
        """Every (sequence, tokens) in batch order: decodes first, then prefill chunks."""
        return [(s, 1) for s in self.decodes] + self.prefills


class Scheduler:
    """Queues of waiting and running sequences and the step's choice.

    Args:
        block_manager: the cache blocks.
        max_num_seqs: running sequences at most.
        max_num_batched_tokens: tokens per step at most.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End seq (finished, aborted or failed): out of the queues, its blocks freed at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._make_room_for_a_waiting_request()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            count = min(seq.num_tokens + len(seq.draft_token_ids) - seq.num_computed_tokens, budget)
            if seq.draft_token_ids and count - 1 < len(seq.draft_token_ids):  # the budget cuts the drafts
                seq.draft_token_ids = seq.draft_token_ids[:max(count - 1, 0)]
                if seq.draft_probs is not None:
                    seq.draft_probs = seq.draft_probs[:len(seq.draft_token_ids)]
            if count <= 0:  # nothing to compute (cannot happen while every sampled token is appended)
                i += 1
                continue
            while not bm.allocate(seq, count):
                victim = self.running.pop()
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._add(step, seq, count)
                budget -= count
                i += 1
                continue
            break
        if step.preempted:
            return step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is None:
                break
            # a prompt whose log-probabilities are asked for is computed whole: a cached block has none
            blocks, hashes = ([], []) if seq.wants_prompt_logprobs else bm.cached_prefix(seq.token_ids)
            num_cached = len(blocks) * bm.block_size
            count = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, count, blocks):
                break
            self.waiting.remove(seq)
            seq.num_computed_tokens, seq.block_hashes = num_cached, list(hashes)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
            bm.count_query(seq.num_tokens, num_cached)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._add(step, seq, count)
            budget -= count
        return step

    def _next_waiting(self) -> Sequence | None:
        """The waiting sequence to admit next: of the request with the fewest running sequences, the oldest
        among equals. Completions of one prompt wait while the first computes the blocks they share."""
        running = Counter(s.fairness_key for s in self.running)
        best = None
        for seq in self.waiting:
            leader = seq.leader
            if leader is not None and leader.status is Status.RUNNING and leader.is_prefilling \
                    and self.block_manager.enable_prefix_caching:
                continue
            if best is None or running[seq.fairness_key] < running[best.fairness_key]:
                best = seq
                if not running[seq.fairness_key]:
                    break
        return best

    def _make_room_for_a_waiting_request(self) -> None:
        """Every slot taken and a request with no running sequence waiting: the newest sequence of the request
        running the most (if more than one) goes back to the queue, so the waiting request starts this step."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        running = Counter(s.fairness_key for s in self.running)
        if all(s.fairness_key in running for s in self.waiting):
            return
        key, count = running.most_common(1)[0]
        if count > 1:
            victim = next(s for s in reversed(self.running) if s.fairness_key == key)
            self.running.remove(victim)
            self._preempt(victim)

    @staticmethod
    def _add(step: ScheduledStep, seq: Sequence, count: int) -> None:
        if count == 1:
            step.decodes.append(seq)
        else:
            step.prefills.append((seq, count))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_sequence(seq)
        seq.drop_drafts()
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, step: ScheduledStep) -> list[Sequence]:
        """Record that the step ran; returns the sequences whose next token is to be sampled now."""
        ready = []
        cache_full_blocks, block_size = self.block_manager.cache_full_blocks, self.block_manager.block_size
        for seq, count in step.scheduled():
            if seq.is_finished:  # ended while the step ran (its blocks are already free)
                continue
            if seq.draft_token_ids:  # verified drafts: advanced by what is accepted (accepted())
                ready.append(seq)
                continue
            seq.num_computed_tokens += count
            if seq.num_computed_tokens >= (len(seq.block_hashes) + 1) * block_size:  # a block filled up
                cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
        return ready

    def accepted(self, seq: Sequence) -> None:
        """After a verify step appended its accepted tokens to an unfinished seq: the cache holds every
        token but the last (the target's own next token), and seq keeps no block beyond its tokens."""
        seq.drop_drafts()
        seq.num_computed_tokens = seq.num_tokens - 1
        bm = self.block_manager
        if seq.num_computed_tokens >= (len(seq.block_hashes) + 1) * bm.block_size:
            bm.cache_full_blocks(seq)
        bm.trim(seq, seq.num_tokens)
