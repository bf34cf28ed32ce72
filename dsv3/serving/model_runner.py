"""The device side of a step: the flat token batch, the model call, recorded decode steps.

Where the backend records steps (backend.graph_runner; CUDA graphs on NVIDIA and AMD), a step whose
tokens fit the largest batch bucket runs as decode rows and replays the recording of its bucket (the
smallest of batch_buckets(max_num_seqs) that holds it): one token per row, each with its position, its
sequence's block table and seq_len = position + 1. A decode is one row; a prompt chunk is one row per
token, the rows of one sequence attending to the rows before them (PagedBatch.shared_rows). So pure
decode steps replay, and so do short chunks such as the uncached tail of a prompt whose prefix is
cached, which then attend absorbed over the cached context (nothing expanded through kv_b) instead of
running an eager step. Each bucket is recorded twice: for steps of decodes alone and for steps with
chunk rows (those write every row's token before attending). The bucket's inputs are static buffers
written in place before each replay; padding rows run token 0 at position 0 through a block table of
zeros, so they write only the scratch block 0, which no sequence owns.

Every other step runs eagerly as one flat batch: decode tokens first (mla_decode), then the prefill
chunks (mla_prefill). Only the rows of sequences that sample a token this step are projected to logits.

A step is first written down as a StepPlan (host data only: tokens, positions, block tables, logits
rows), then executed. Over several ranks (dsv3.serving.workers) rank 0 sends each plan to the other
ranks before executing it, and every rank runs the same forward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from dsv3.backends.interface import PagedBatch
from dsv3.model import ForwardBatch, Transformer
from dsv3.serving.block_manager import SCRATCH_BLOCK
from dsv3.serving.request import Sequence
from dsv3.serving.scheduler import ScheduledStep


def batch_buckets(max_num_seqs: int, rows_per_seq: int = 1) -> tuple[int, ...]:
    """Row counts with their own recording: powers of two below max_num_seqs, then it; with rows_per_seq > 1
    (speculative decoding verifies 1 + k tokens per sequence) also each of those times rows_per_seq."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    buckets.append(max_num_seqs)
    return tuple(sorted({*buckets, *(b * rows_per_seq for b in buckets)}))


@dataclass
class _Bucket:
    """A decode bucket's static buffers and its recorded step."""

    tokens: torch.Tensor        # int64 [size]
    positions: torch.Tensor     # int64 [size]
    block_tables: torch.Tensor  # int32 [size, max_blocks_per_seq]
    seq_lens: torch.Tensor      # int32 [size]
    logits: torch.Tensor        # float32 [size, vocab]
    replay: Callable[[], None]
    hidden: torch.Tensor | None = None  # [size, D] final-norm hidden states, where kept (keep_hidden)
    staging: "_Staging | None" = None
    batch: ForwardBatch | None = None  # what the recording reads: every tensor of it must outlive the recording


#: a row of a step: (token id, its position, its sequence's block table)
Row = tuple[int, int, list[int]]


@dataclass
class StepPlan:
    """One step's inputs as host data: what every rank needs to run the same forward.

    Attributes:
        tokens: per scheduled sequence (decodes first, then prefill chunks), the token ids it runs
            (draft tokens included).
        starts: per scheduled sequence, the position of its first token this step.
        block_tables: per scheduled sequence, its block table.
        num_decodes: how many of the first sequences decode (one token each).
        logits_rows: the rows whose logits are wanted.
        dp_num_tokens: under data-parallel attention, every DP rank's token count this step (None without).
    """

    tokens: list[list[int]]
    starts: list[int]
    block_tables: list[list[int]]
    num_decodes: int
    logits_rows: list[int]
    dp_num_tokens: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def rows(self) -> list[Row]:
        return [(token, start + j, table) for tokens, start, table in zip(self.tokens, self.starts, self.block_tables)
                for j, token in enumerate(tokens)]


class _Staging:
    """A bucket's inputs on the host, kept between steps: each step writes its tokens, positions and
    lengths in place, and a row of block tables only where its sequence or table changed.

    The rows' tables are known by the list object a sequence holds and its length: the block manager only
    appends to a table, and a freed or trimmed sequence gets a new list (held here, so its identity is not
    reused).
    """

    def __init__(self, size: int, width: int):
        self.tokens = torch.zeros(size, dtype=torch.long)
        self.positions = torch.zeros(size, dtype=torch.long)
        self.seq_lens = torch.ones(size, dtype=torch.int32)
        self.block_tables = torch.zeros(size, width, dtype=torch.int32)
        self.np_tokens, self.np_positions = self.tokens.numpy(), self.positions.numpy()
        self.np_seq_lens, self.np_tables = self.seq_lens.numpy(), self.block_tables.numpy()
        self.rows: list[tuple[list[int], int] | None] = [None] * size  # None: a padding row (zeros)
        self.tables_copied = False  # the device's block tables equal these

    def write(self, step_rows: list[Row]) -> None:
        n = len(step_rows)
        self.np_positions[:n] = [position for _, position, _ in step_rows]
        self.np_positions[n:] = 0
        self.np_tokens[:n] = [token for token, _, _ in step_rows]
        self.np_tokens[n:] = 0
        self.np_seq_lens[:n] = self.np_positions[:n] + 1
        self.np_seq_lens[n:] = 1
        rows = self.rows
        for i, (_, _, table) in enumerate(step_rows):
            row = rows[i]
            if row is None or row[0] is not table or row[1] != len(table):
                known = row[1] if row is not None and row[0] is table else 0
                self.np_tables[i, known:len(table)] = table[known:]
                if row is not None and row[0] is not table:
                    self.np_tables[i, len(table):row[1]] = SCRATCH_BLOCK
                rows[i] = (table, len(table))
                self.tables_copied = False
        for i in range(n, len(rows)):
            if rows[i] is not None:
                self.np_tables[i, :rows[i][1]] = SCRATCH_BLOCK
                rows[i] = None
                self.tables_copied = False


class ModelRunner:
    """Runs scheduled steps on the model.

    Args:
        model: the model, its cache allocated.
        block_size: tokens per cache block.
        max_num_seqs: the largest decode batch.
        max_model_len: the longest sequence.
        enforce_eager: never record decode steps.
        rows_per_seq: rows a sequence runs in a verify step (1 + k with speculative decoding, else 1).
        keep_hidden: keep every row's final-norm hidden state in `hidden` (the speculative proposer reads them).
    """

    def __init__(self, model: Transformer, block_size: int, max_num_seqs: int, max_model_len: int,
                 enforce_eager: bool = False, rows_per_seq: int = 1, keep_hidden: bool = False):
        self.model, self.block_size = model, block_size
        self.device = model.backend.device
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.buckets = batch_buckets(max_num_seqs, rows_per_seq)
        self.graphs = not enforce_eager and model.supports_graphs()
        #: where other ranks run every step too: the channel each step's plan goes out on (workers.StepChannel)
        self.channel = None
        #: the logits of the next `run`'s step where it was run already (data_parallel.DataParallelEngine)
        self.precomputed: torch.Tensor | None = None
        self._recorded: dict[tuple[int, bool], _Bucket] = {}  # (size, shared rows) -> bucket
        self.keep_hidden = keep_hidden
        self.hidden: torch.Tensor | None = None
        #: after `run`: (sequence, first position, logits [n, V]) of the prompt rows whose log-probabilities
        #: were asked for (SamplingParams.prompt_logprobs): row j predicts the prompt token at position + j + 1
        self.prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = []

    def record_all(self) -> None:
        """Record every bucket now, for decode steps and for steps with chunk rows (all rows padding,
        writing only block 0), so that no step waits for a recording later; stops at the first the backend
        declines."""
        with torch.inference_mode():
            for key in ((size, shared) for shared in (False, True) for size in self.buckets
                        if shared or size <= self.max_num_seqs):  # decodes alone never fill a larger one
                if not self.graphs:
                    return
                try:
                    if key not in self._recorded and self._record(*key, []) is None:
                        self.graphs = False
                except Exception as e:  # noqa: BLE001 - eager steps still serve; say why they are slower
                    warnings.warn(f"recording the decode step of batch {key[0]} failed, decode runs eagerly: "
                                  f"{type(e).__name__}: {e}", stacklevel=2)
                    self.graphs = False

    @property
    def recorded_buckets(self) -> tuple[int, ...]:
        """The sizes recorded for decode steps."""
        return tuple(sorted(size for size, shared in self._recorded if not shared))

    @property
    def recorded_row_buckets(self) -> tuple[int, ...]:
        """The sizes recorded for steps with chunk rows."""
        return tuple(sorted(size for size, shared in self._recorded if shared))

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket holding `batch` rows, or None."""
        return next((size for size in self.buckets if size >= batch), None)

    def replays(self, step: ScheduledStep) -> bool:
        """Whether `run` replays a recorded step for it (which returns once the step is queued on an
        accelerator), rather than running the model eagerly or recording."""
        if not self.graphs:
            return False
        size = self.bucket(step.num_tokens)
        return size is not None and (size, bool(step.prefills)) in self._recorded

    def plan(self, step: ScheduledStep) -> tuple[list[Sequence], list[tuple], StepPlan]:
        """The step written down: the sequences that sample after it (their chunk reaches their last token),
        the prompt spans whose log-probabilities it computes (seq, first position, first row, rows), and its
        plan. Its logits rows: one per sampling sequence, or 1 + len(draft_token_ids) (one per verified
        position) for a sequence with draft tokens; then each prompt span's rows."""
        tokens, starts, tables, logits_rows, seqs, prompt_spans = [], [], [], [], [], []
        end = 0
        for seq, count in step.scheduled():
            start = seq.num_computed_tokens
            drafts = seq.draft_token_ids
            tokens.append([seq.token_at(p) for p in range(start, start + count)] if drafts else
                          seq.token_ids[start:start + count])
            starts.append(start)
            tables.append(seq.block_table)
            end += count
            if start + count == len(seq.token_ids) + len(drafts):
                seqs.append(seq)
                logits_rows += range(end - 1 - len(drafts), end)
            if seq.wants_prompt_logprobs and start + 1 < seq.num_prompt_tokens:
                prompt_spans.append((seq, start, end - count, min(count, seq.num_prompt_tokens - 1 - start)))
        logits_rows += [row + j for _, _, row, n in prompt_spans for j in range(n)]
        return seqs, prompt_spans, StepPlan(tokens, starts, tables, len(step.decodes), logits_rows)

    def run(self, step: ScheduledStep) -> tuple[list[Sequence], torch.Tensor]:
        """Run a step; returns the sequences that sample now and their float32 logits in that order (see
        `plan`); the prompt spans' logits go to `prompt_logits`. Over several ranks the plan goes to the
        other ranks first (self.channel)."""
        seqs, prompt_spans, plan = self.plan(step)
        if self.precomputed is not None:  # run already, with the other DP groups' steps (data_parallel)
            logits, self.precomputed = self.precomputed, None
        elif self.channel is None:
            logits = self.execute(plan)
        else:
            with self.channel.lock:
                self.channel.send(plan)
                logits = self.execute(plan)
        self.prompt_logits, row = [], len(plan.logits_rows) - sum(n for *_, n in prompt_spans)
        num_sampling = row
        for seq, start, _, n in prompt_spans:
            self.prompt_logits.append((seq, start, logits[row:row + n]))
            row += n
        return seqs, logits[:num_sampling]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Run a planned step: float32 logits [len(plan.logits_rows), V]. With keep_hidden, `hidden` then
        holds every row's final-norm hidden state [num_tokens, D] (else None)."""
        self.hidden = None
        size = self.bucket(plan.num_tokens)
        if self.graphs and size is not None:
            rows = plan.rows()
            bucket = self._replay(size, plan.num_decodes < len(plan.tokens), rows)
            if bucket is not None:
                self.hidden = None if bucket.hidden is None else bucket.hidden[:len(rows)]
                if plan.logits_rows == list(range(len(rows))):
                    return bucket.logits[:len(rows)]
                return bucket.logits[torch.tensor(plan.logits_rows, dtype=torch.long, device=self.device)]
        batch = self._eager_batch(plan)
        if not self.keep_hidden:
            return self.model.forward(batch)
        self.hidden = self.model.hidden(batch)
        return self.model.project(self.hidden[batch.logits_indices])

    # ---- eager ------------------------------------------------------------------------------------

    def _eager_batch(self, plan: StepPlan) -> ForwardBatch:
        """The step as one flat batch: decode tokens, then the prefill chunks through mla_prefill."""
        tokens, positions = [], []
        for chunk, start in zip(plan.tokens, plan.starts, strict=True):
            tokens += chunk
            positions += range(start, start + len(chunk))
        d = plan.num_decodes
        decode = self._paged(plan.block_tables[:d], plan.starts[:d], [1] * d) if d else None
        prefill = None
        if d < len(plan.tokens):
            prefill = self._paged(plan.block_tables[d:], plan.starts[d:], [len(t) for t in plan.tokens[d:]])
        device = self.device
        return ForwardBatch(tokens=torch.tensor(tokens, dtype=torch.long, device=device),
                            positions=torch.tensor(positions, dtype=torch.long, device=device),
                            num_decode_tokens=d, decode=decode, prefill=prefill,
                            logits_indices=torch.tensor(plan.logits_rows, dtype=torch.long, device=device),
                            dp_num_tokens=plan.dp_num_tokens)

    def _paged(self, block_tables: list[list[int]], starts: list[int], counts: list[int]) -> PagedBatch:
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [SCRATCH_BLOCK] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        seq_lens = [start + n for start, n in zip(starts, counts, strict=True)]
        query_start = [0]
        for n in counts:
            query_start.append(query_start[-1] + n)
        device = self.device
        return PagedBatch(block_tables=tables.to(device),
                          seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                          query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
                          max_query_len=max(counts), max_seq_len=max(seq_lens))

    # ---- recorded steps ---------------------------------------------------------------------------

    def _replay(self, size: int, shared: bool, rows: list[Row]) -> _Bucket | None:
        bucket = self._recorded.get((size, shared))
        if bucket is None:
            bucket = self._record(size, shared, rows)
            if bucket is None:
                self.graphs = False
                return None
        else:
            self._fill(bucket, rows)
        bucket.replay()
        return bucket

    def _fill(self, bucket: _Bucket, rows: list[Row]) -> None:
        """Write the step's inputs into the bucket's buffers; padding rows write only block 0."""
        staging = bucket.staging
        if staging is None:
            staging = bucket.staging = _Staging(bucket.tokens.shape[0], self.max_blocks_per_seq)
        staging.write(rows)
        for buffer, value in ((bucket.tokens, staging.tokens), (bucket.positions, staging.positions),
                              (bucket.seq_lens, staging.seq_lens)):
            buffer.copy_(value, non_blocking=True)
        if not staging.tables_copied:
            bucket.block_tables.copy_(staging.block_tables, non_blocking=True)
            staging.tables_copied = True

    def _record(self, size: int, shared: bool, rows: list[Row]) -> _Bucket | None:
        """Allocate a bucket's buffers, fill them with this step's inputs and record the step."""
        model, device = self.model, self.device
        bucket = _Bucket(tokens=torch.zeros(size, dtype=torch.long, device=device),
                         positions=torch.zeros(size, dtype=torch.long, device=device),
                         block_tables=torch.zeros(size, self.max_blocks_per_seq, dtype=torch.int32, device=device),
                         seq_lens=torch.ones(size, dtype=torch.int32, device=device),
                         logits=torch.zeros(size, model.config.vocab_size, dtype=torch.float32, device=device),
                         replay=lambda: None)
        if self.keep_hidden:
            bucket.hidden = torch.zeros(size, model.config.hidden_size, dtype=model.dtype, device=device)
        self._fill(bucket, rows)
        paged = PagedBatch(block_tables=bucket.block_tables, seq_lens=bucket.seq_lens,
                           query_start=torch.arange(size + 1, dtype=torch.int32, device=device),
                           max_query_len=1, max_seq_len=self.max_model_len, shared_rows=shared)
        batch = bucket.batch = ForwardBatch(bucket.tokens, bucket.positions, size, paged, None)

        def step() -> None:
            if bucket.hidden is None:
                bucket.logits.copy_(model.forward(batch))
            else:
                bucket.hidden.copy_(model.hidden(batch))
                bucket.logits.copy_(model.project(bucket.hidden))

        replay = model.backend.graph_runner(step)
        if replay is None:
            return None
        bucket.replay = replay
        self._recorded[(size, shared)] = bucket
        return bucket
