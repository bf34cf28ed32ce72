"""The MTP proposer's draft step, recorded where the backend records steps (backend.graph_runner).

Run eagerly, the draft is a few dozen small kernels launched from Python for each of its 1 + (k - 1) module
passes, and at small batches it costs more host time than the recorded target step it follows. Recorded,
one replay runs the whole draft on the device:
- the cache fill: the module over the positions the step computed, as decode rows that attend to the rows
  before them (PagedBatch.shared_rows), each row's hidden state gathered from the target's step;
- the proposal: the module's argmax at each drafting sequence's last row, then k - 1 one-row passes over
  its own output and that argmax (the tokens never leave the device), the draft tokens written to `drafts`.

A recording is kept per (fill rows, drafting rows) pair of buckets; its inputs are static buffers written in
place before each replay. Padding rows run token 0 at position 0 through a block table of zeros, so they write
only the scratch block 0; so do a sequence's recurrent rows past its own draft count. Only greedy drafts are
recorded (a sampled draft is drawn on the host from each sequence's generator); the proposer runs the rest
eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dsv3.backends.interface import PagedBatch
from dsv3.model import MTP, ForwardBatch, Transformer


@dataclass
class _Recording:
    """One bucket pair's static buffers and its replay."""

    hidden: torch.Tensor          # [rows, D] the target's hidden state at each fill row
    tokens: torch.Tensor          # int64 [rows] the token after each fill row's position
    positions: torch.Tensor       # int64 [rows]
    seq_lens: torch.Tensor        # int32 [rows]
    tables: torch.Tensor          # int32 [rows, width]
    last: torch.Tensor            # int64 [drafting] each drafting sequence's last fill row
    step_tokens: torch.Tensor     # int64 [k - 1, drafting] (written on the device)
    step_positions: torch.Tensor  # int64 [k - 1, drafting]
    step_seq_lens: torch.Tensor   # int32 [k - 1, drafting]
    step_tables: torch.Tensor     # int32 [k - 1, drafting, width]
    drafts: torch.Tensor          # int64 [drafting, k] the proposed tokens
    batches: list[ForwardBatch]   # what the recording reads: every tensor of it must outlive the recording
    replay: Callable[[], None] | None = None


#: a recurrent row of a drafting sequence: (position, block table with spares), or None past its draft count
StepRow = tuple[int, list[int]] | None


class DraftRecordings:
    """The recorded draft steps of one MTP module.

    Args:
        model: the model (its backend records; its rotary tables serve the module).
        module: the MTP module.
        cache: the module's latent cache pool.
        k: draft tokens per sequence.
        buckets: row counts with their own recording (the model runner's).
        width: block table columns (the longest table with its spare blocks).
        max_seq_len: the longest sequence a row attends over.
    """

    def __init__(self, model: Transformer, module: MTP, cache: torch.Tensor, k: int, buckets: tuple[int, ...],
                 width: int, max_seq_len: int):
        self.model, self.module, self.cache, self.k = model, module, cache, k
        self.buckets, self.width, self.max_seq_len = buckets, width, max_seq_len
        self.enabled = True
        self._recorded: dict[tuple[int, int], _Recording] = {}

    @property
    def recorded(self) -> tuple[tuple[int, int], ...]:
        """The (fill rows, drafting rows) bucket pairs recorded so far."""
        return tuple(sorted(self._recorded))

    def _bucket(self, n: int) -> int | None:
        return next((size for size in self.buckets if size >= n), None)

    def run(self, hidden: torch.Tensor, hidden_rows: list[int], tokens: list[int], positions: list[int],
            tables: list[list[int]], last: list[int], steps: list[list[StepRow]]) -> list[list[int]] | None:
        """Fill the module's cache and draft k tokens per drafting sequence, by replaying a recording.

        Args:
            hidden: the target step's hidden states; fill row i reads hidden[hidden_rows[i]].
            tokens, positions, tables: per fill row, the token after its position, the position and its
                sequence's block table.
            last: per drafting sequence, its last fill row.
            steps: per drafting sequence, its k - 1 recurrent rows.
        Returns:
            Per drafting sequence its k draft tokens; None where the rows fit no bucket or the backend
            declines to record (`enabled` is then False); the caller then runs the draft eagerly.
        """
        size, drafting = self._bucket(len(tokens)), self._bucket(len(last)) if last else 0
        if size is None or drafting is None:
            return None
        recording = self._recorded.get((size, drafting))
        fresh = recording is None
        if fresh:
            recording = self._allocate(size, drafting)
        self._fill(recording, hidden, hidden_rows, tokens, positions, tables, last, steps)
        if fresh:
            recording.replay = self.model.backend.graph_runner(self._step(recording))
            if recording.replay is None:
                self.enabled = False
                return None
            self._recorded[(size, drafting)] = recording
        recording.replay()
        return recording.drafts[:len(last)].tolist() if last else []

    def _allocate(self, size: int, drafting: int) -> _Recording:
        device, k, width = self.model.backend.device, self.k, self.width
        steps = max(k - 1, 0)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        r = _Recording(hidden=zeros(size, self.model.config.hidden_size, dtype=self.model.dtype),
                       tokens=zeros(size), positions=zeros(size), seq_lens=zeros(size, dtype=torch.int32) + 1,
                       tables=zeros(size, width, dtype=torch.int32), last=zeros(drafting),
                       step_tokens=zeros(steps, drafting), step_positions=zeros(steps, drafting),
                       step_seq_lens=zeros(steps, drafting, dtype=torch.int32) + 1,
                       step_tables=zeros(steps, drafting, width, dtype=torch.int32), drafts=zeros(drafting, k),
                       batches=[])
        r.batches.append(self._batch(r.tokens, r.positions, r.tables, r.seq_lens, shared_rows=True))
        for s in range(steps if drafting else 0):
            r.batches.append(self._batch(r.step_tokens[s], r.step_positions[s], r.step_tables[s],
                                         r.step_seq_lens[s], shared_rows=False))
        return r

    def _batch(self, tokens, positions, tables, seq_lens, shared_rows: bool) -> ForwardBatch:
        n = tokens.shape[0]
        paged = PagedBatch(block_tables=tables, seq_lens=seq_lens,
                           query_start=torch.arange(n + 1, dtype=torch.int32, device=tokens.device),
                           max_query_len=1, max_seq_len=self.max_seq_len, shared_rows=shared_rows)
        return ForwardBatch(tokens, positions, n, paged, None)

    def _step(self, r: _Recording) -> Callable[[], None]:
        """The draft on the recording's buffers: reads and writes only them and the module's cache."""
        module, cache, cos, sin = self.module, self.cache, self.model.cos, self.model.sin
        drafting = r.last.shape[0]

        def step() -> None:
            fill = r.batches[0]
            out = module(r.hidden, r.tokens, cache, fill, cos[r.positions], sin[r.positions])
            if not drafting:
                return
            h = out[r.last]
            r.drafts[:, 0].copy_(module.project(h).argmax(dim=-1))
            for s, batch in enumerate(r.batches[1:]):
                r.step_tokens[s].copy_(r.drafts[:, s])
                h = module(h, r.step_tokens[s], cache, batch, cos[r.step_positions[s]], sin[r.step_positions[s]])
                r.drafts[:, s + 1].copy_(module.project(h).argmax(dim=-1))

        return step

    def _fill(self, r: _Recording, hidden: torch.Tensor, hidden_rows: list[int], tokens: list[int],
              positions: list[int], tables: list[list[int]], last: list[int], steps: list[list[StepRow]]) -> None:
        """Write a draft's inputs into the buffers; padding rows run at position 0 through block 0."""
        size, n, width = r.tokens.shape[0], len(tokens), self.width
        index = torch.tensor(hidden_rows, dtype=torch.long, device=hidden.device)
        torch.index_select(hidden, 0, index, out=r.hidden[:n])
        host_tokens, host_positions = np.zeros(size, np.int64), np.zeros(size, np.int64)
        host_tokens[:n], host_positions[:n] = tokens, positions
        host_tables = np.zeros((size, width), np.int32)
        for i, table in enumerate(tables):
            host_tables[i, :len(table)] = table
        r.tokens.copy_(torch.from_numpy(host_tokens))
        r.positions.copy_(torch.from_numpy(host_positions))
        r.seq_lens.copy_(torch.from_numpy((host_positions + 1).astype(np.int32)))
        r.tables.copy_(torch.from_numpy(host_tables))
        drafting = r.last.shape[0]
        if not drafting:
            return
        host_last = np.zeros(drafting, np.int64)
        host_last[:len(last)] = last
        r.last.copy_(torch.from_numpy(host_last))
        num_steps = r.step_positions.shape[0]
        step_positions = np.zeros((num_steps, drafting), np.int64)
        step_tables = np.zeros((num_steps, drafting, width), np.int32)
        for i, rows in enumerate(steps):
            for s, row in enumerate(rows):
                if row is not None:
                    step_positions[s, i] = row[0]
                    step_tables[s, i, :len(row[1])] = row[1]
        r.step_positions.copy_(torch.from_numpy(step_positions))
        r.step_seq_lens.copy_(torch.from_numpy((step_positions + 1).astype(np.int32)))
        r.step_tables.copy_(torch.from_numpy(step_tables))
