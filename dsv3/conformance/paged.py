"""Sequences laid out in a paged latent cache, for the MLA cases and the backend tests: block tables
with shuffled, shared and padding entries, and the PagedBatch of one prefill or decode call.
"""

from __future__ import annotations

import torch

from dsv3.backends.interface import MLAInputs, PagedBatch


def block_tables(seq_lens: list[int], block_size: int, g: torch.Generator,
                 shared: tuple[int, int, int] | None = None, spare_blocks: int = 3) -> tuple[torch.Tensor, int]:
    """Block tables for sequences that grow to `seq_lens` tokens, their blocks drawn in random order.

    Block 0 is left out (the engine's scratch block), every table has one padding column of zeros, and
    `spare_blocks` blocks of the pool stay unused.

    Args:
        seq_lens: final tokens per sequence.
        block_size: tokens per block.
        g: the generator that shuffles the pool.
        shared: (a, b, n): sequence b's first n blocks are sequence a's (a cached prefix), a and b in any order.
    Returns:
        (int32 [B, max_blocks + 1] tables, num_blocks of the pool).
    """
    per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(per_seq, default=0) + 1
    reused = shared[2] if shared else 0
    needed = sum(per_seq) - reused
    num_blocks = 1 + needed + spare_blocks
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    donor_first = sorted(range(len(seq_lens)), key=lambda seq: not shared or seq != shared[0])
    for seq in donor_first:
        count, first = per_seq[seq], 0
        if shared and seq == shared[1]:
            tables[seq, :reused] = tables[shared[0], :reused]
            first = reused
        for block in range(first, count):
            tables[seq, block] = order.pop()
    return tables, num_blocks


def paged_batch(tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                device: torch.device | str = "cpu") -> PagedBatch:
    """The PagedBatch of one call: sequence b has query_lens[b] new tokens ending at seq_lens[b]."""
    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(block_tables=tables.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
                      query_start=query_start.to(device), max_query_len=max(query_lens),
                      max_seq_len=max(seq_lens))


def take_rows(inputs: MLAInputs, rows: torch.Tensor | list[int] | slice) -> MLAInputs:
    """The MLAInputs of some token rows."""
    return MLAInputs(*(t[rows] for t in (inputs.q_nope, inputs.q_pe, inputs.latent, inputs.k_pe)))


def concat(parts: list[MLAInputs]) -> MLAInputs:
    """Token rows of several MLAInputs, one after the other."""
    return MLAInputs(*(torch.cat(group) for group in zip(*((p.q_nope, p.q_pe, p.latent, p.k_pe) for p in parts),
                                                          strict=True)))
