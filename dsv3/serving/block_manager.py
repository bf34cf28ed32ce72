"""Cache blocks: allocation, reference counts, prefix hashes and the LRU queue of free blocks.

The paged latent cache is `num_blocks` blocks of `block_size` tokens per layer. Block 0 is never
handed out: padding rows of a recorded decode step write there. A block's content hash chains
through its parent's (hash of the parent's hash and the block's tokens), so equal hashes mean equal
prefixes. Only full blocks whose tokens are all computed are hashed. A freed block keeps its hash in
the free queue and can be revived by a later request with the same prefix until it is reused for
other tokens (the least recently freed first; a sequence's last blocks and unhashed blocks go first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence as Seq

from dsv3.errors import Dsv3Error
from dsv3.serving.request import Sequence

SCRATCH_BLOCK = 0


def block_hash(parent: int | None, tokens: Seq[int]) -> int:
    """The chained content hash of a full block."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Owns the cache blocks of every layer (the same table serves all layers).

    Args:
        num_blocks: blocks in each layer's pool, the scratch block included.
        block_size: tokens per block.
        enable_prefix_caching: reuse cached blocks of equal prefixes.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2 or block_size < 1:
            raise Dsv3Error(f"the cache needs at least 2 blocks of at least 1 token, got {num_blocks} of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.free: OrderedDict[int, None] = OrderedDict()  # blocks used and freed since, least recent first
        self.next_fresh = 1  # blocks next_fresh.. were never handed out (a pool may have millions)
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0     # of which found cached

    # ---- queries -----------------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + self.num_blocks - self.next_fresh

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks held by sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, token_ids: Seq[int]) -> tuple[list[int], list[int]]:
        """(blocks, hashes) of the longest cached run of full blocks at the start of `token_ids`,
        leaving at least the last token to compute (its logits are needed)."""
        blocks, hashes, parent = [], [], None
        if not self.enable_prefix_caching:
            return blocks, hashes
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def count_query(self, num_tokens: int, num_hits: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hits

    # ---- allocation --------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Seq[int] = ()) -> bool:
        """Extend seq's block table to hold its computed tokens, `cached_blocks` (a prefix found with
        cached_prefix, for a sequence with no blocks yet) and `num_new_tokens` more.

        Returns False, changing nothing, when too few blocks are free.
        """
        table = seq.block_table
        num_tokens = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        if not cached_blocks and num_tokens <= len(table) * self.block_size:
            return True  # the common decode step: its last block has room
        needed = self.blocks_for(num_tokens) - len(table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if max(needed, 0) + revived > self.num_free_blocks:
            return False
        for block in cached_blocks:
            self._take(block)
            table.append(block)
        for _ in range(needed):
            table.append(self._pop_free())
        return True

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        """An unhashed freed block, else a never-used one, else the least recently freed (its hash evicted)."""
        front = next(iter(self.free), None)
        if (front is None or self.hashes[front] is not None) and self.next_fresh < self.num_blocks:
            block = self.next_fresh
            self.next_fresh += 1
            self.ref_counts[block] = 1
            return block
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:  # evicted: its content is about to be overwritten
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash seq's blocks that are now full and computed, and offer them to later requests."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            seq.block_hashes.append(parent)
            block = seq.block_table[i]
            if parent not in self.cached and self.hashes[block] is None:
                self.cached[parent] = block
                self.hashes[block] = parent

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free seq's blocks beyond the first `num_tokens` tokens (those of rejected draft tokens)."""
        keep = self.blocks_for(num_tokens)
        if keep >= len(seq.block_table):
            return
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)  # never hashed: its tokens were not computed
        seq.block_table = seq.block_table[:keep]  # a new list: tables only grow in place (model_runner._Staging)

    def free_sequence(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks; blocks nobody holds join the free queue (last blocks evicted first)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:  # nothing to reuse: hand it out before any cached block
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def check_all_free(self) -> list[str]:
        """What is wrong, if anything, for a manager no sequence holds (tests and leak checks)."""
        problems = []
        held = [b for b in range(1, self.num_blocks) if self.ref_counts[b]]
        if held:
            problems.append(f"blocks still held: {held[:10]}")
        if self.num_free_blocks != self.num_usable_blocks:
            problems.append(f"{self.num_free_blocks} of {self.num_usable_blocks} blocks free")
        if SCRATCH_BLOCK in self.free or self.ref_counts[SCRATCH_BLOCK]:
            problems.append("the scratch block was handed out")
        return problems
