"""The recorded decode step's host inputs: written in place step after step, they must equal inputs
built afresh from the sequences (rows that change sequence, grow a block, turn to padding, or hold a
sequence whose table was freed and rebuilt)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from dsv3.serving.block_manager import SCRATCH_BLOCK
from dsv3.serving.model_runner import _Staging


def fresh(seqs, size: int, width: int):
    padding = size - len(seqs)
    positions = [s.num_computed_tokens for s in seqs] + [0] * padding
    tokens = [s.token_ids[s.num_computed_tokens] for s in seqs] + [0] * padding
    tables = [s.block_table + [SCRATCH_BLOCK] * (width - len(s.block_table)) for s in seqs]
    tables += [[SCRATCH_BLOCK] * width] * padding
    return (torch.tensor(tokens), torch.tensor(positions), torch.tensor([p + 1 for p in positions], dtype=torch.int32),
            torch.tensor(tables, dtype=torch.int32))


class Seq(SimpleNamespace):
    """What _Staging reads of a Sequence."""

    def token_at(self, position: int) -> int:
        return self.token_ids[position]


def test_staging_written_in_place_equals_fresh_inputs():
    rng = random.Random(0)
    size, width, block_size = 8, 6, 4
    seqs = [Seq(token_ids=[rng.randrange(100) for _ in range(rng.randrange(1, 10))], block_table=[],
                            num_computed_tokens=0) for _ in range(12)]
    next_block = iter(range(1, 10_000))
    staging = _Staging(size, width)
    for _ in range(300):
        for s in seqs:
            if rng.random() < 0.05 or len(s.token_ids) >= width * block_size:  # freed: a new list, recomputed
                s.token_ids = s.token_ids[:rng.randrange(1, 6)]
                s.block_table = []
            s.num_computed_tokens = len(s.token_ids) - 1
            while len(s.block_table) * block_size < len(s.token_ids):
                s.block_table.append(next(next_block))
        batch = rng.sample(seqs, rng.randrange(0, size + 1))
        staging.write([(s.token_ids[s.num_computed_tokens], s.num_computed_tokens, s.block_table) for s in batch])
        expected = fresh(batch, size, width)
        for got, want in zip((staging.tokens, staging.positions, staging.seq_lens, staging.block_tables), expected):
            assert torch.equal(got, want)
        for s in batch:
            s.token_ids.append(rng.randrange(100))
