"""Generation: prefill each prompt into its cache row, then decode the batch one token at a time.

Decode steps go through a `DecodeRunner`, which replays a recording of the step (a CUDA graph)
per batch-size bucket where the backend can record one; each step synchronises the host once,
to read the sampled tokens.
"""

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


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes that get their own decode recording: powers of two below max_batch_size, then it."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def spare_slots(slots: torch.Tensor, num_slots: int, count: int) -> torch.Tensor:
    """`count` cache rows in [0, num_slots) that none of `slots` [B] uses, found on the device.

    Unused rows sort first in a stable sort of the used flags, so with B distinct slots there
    are num_slots - B of them to take from.
    """
    used = torch.zeros(num_slots, dtype=torch.int8, device=slots.device)
    used[slots] = 1
    return torch.argsort(used, stable=True)[:count]


@dataclass
class _Bucket:
    """A bucket's static buffers and its recorded step."""

    tokens: torch.Tensor     # [size] int64
    slots: torch.Tensor      # [size] int64
    positions: torch.Tensor  # [size] int64
    logits: torch.Tensor     # [size, vocab] float32
    replay: Callable[[], None]


class DecodeRunner:
    """Decode steps replayed from per-bucket recordings where the backend makes them.

    A batch of B sequences runs in the smallest bucket >= B (batch_buckets): its tokens, slots
    and positions are copied into the bucket's static buffers and the bucket's recording
    (backend.graph_runner, made on first use) replays. Rows past B are padding: token 0 at
    position 0 in a cache row none of the B sequences uses, so they write only there; there
    are enough such rows because no bucket exceeds max_batch_size. Where the backend records
    nothing (graph_runner gives None), or with graphs=False, steps run eagerly at size B.

    Args:
        model: the model whose `decode` is run.
        graphs: use the backend's recordings (False: always eager).
    """

    def __init__(self, model: Transformer, graphs: bool = True):
        self.model = model
        self.buckets = batch_buckets(model.max_batch_size)
        # a model split over ranks (dsv3.parallel) finds its local experts on the host: eager
        self.graphs = graphs and getattr(model, "plan", None) is None
        self._recorded: dict[int, _Bucket] = {}

    def bucket(self, batch: int) -> int:
        """The bucket a batch of `batch` sequences runs in."""
        for size in self.buckets:
            if size >= batch:
                return size
        raise Dsv3Error(f"decode batch of {batch} exceeds max_batch_size={self.model.max_batch_size}")

    @property
    def recorded_buckets(self) -> tuple[int, ...]:
        """Buckets recorded so far."""
        return tuple(sorted(self._recorded))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of one decode step, as Transformer.decode(tokens [B], slots [B], positions [B]).

        The slots must be distinct. From a recording, the logits are a view of the bucket's output
        buffer, valid until the next step of that bucket.
        """
        batch = tokens.shape[0]
        size = self.bucket(batch)
        if not self.graphs:
            return self.model.decode(tokens, slots, positions)
        bucket = self._recorded.get(size)
        if bucket is None:
            bucket = self._record(size, tokens, slots, positions)
            if bucket is None:
                return self.model.decode(tokens, slots, positions)
        else:
            self._fill(bucket, tokens, slots, positions)
        bucket.replay()
        return bucket.logits[:batch]

    def _fill(self, bucket: _Bucket, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        batch, size = tokens.shape[0], bucket.tokens.shape[0]
        bucket.tokens[:batch].copy_(tokens)
        bucket.slots[:batch].copy_(slots)
        bucket.positions[:batch].copy_(positions)
        if batch < size:
            bucket.tokens[batch:].zero_()
            bucket.positions[batch:].zero_()
            bucket.slots[batch:].copy_(spare_slots(slots, self.model.max_batch_size, size - batch))

    def _record(self, size: int, tokens: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor) -> _Bucket | None:
        """Allocate a bucket's buffers, fill them with this step's inputs and record the step."""
        m = self.model
        device = m.backend.device
        buffers = [torch.zeros(size, dtype=torch.int64, device=device) for _ in range(3)]
        logits = torch.zeros(size, m.config.vocab_size, dtype=torch.float32, device=device)
        bucket = _Bucket(*buffers, logits, replay=lambda: None)
        self._fill(bucket, tokens, slots, positions)

        def step() -> None:
            logits.copy_(m.decode(bucket.tokens, bucket.slots, bucket.positions))

        replay = m.backend.graph_runner(step)
        if replay is None:
            self.graphs = False
            return None
        bucket.replay = replay
        self._recorded[size] = bucket
        return bucket


class Engine:
    """Batched generation over a model's preallocated latent cache.

    Args:
        model: the model.
        graphs: replay decode steps from the backend's recordings where it makes them (DecodeRunner).
    """

    def __init__(self, model: Transformer, graphs: bool = True):
        self.model = model
        self.decoder = DecodeRunner(model, graphs)

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
        lengths = [len(p) for p in prompts]  # the position each sequence's next token takes, on the host
        positions = torch.tensor(lengths, device=device)
        stop_ids = set(params.stop_ids)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(params.max_new_tokens):
            tokens = sample(logits, params, generator)
            for i, token in enumerate(tokens.tolist()):  # the step's one host synchronisation
                if done[i]:
                    continue
                outputs[i].append(token)
                if on_token:
                    on_token(i, token)
                done[i] = token in stop_ids or lengths[i] + 1 >= m.max_seq_len
                lengths[i] += 1
            if all(done):
                break
            logits = self.decoder(tokens, slots, positions)
            positions = (positions + 1).clamp(max=m.max_seq_len - 1)
        return outputs
