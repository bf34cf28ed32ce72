"""The block manager: allocation, reference counts, prefix hashes and the LRU of free blocks."""

from __future__ import annotations

import pytest

from dsv3.errors import Dsv3Error
from dsv3.serving.block_manager import SCRATCH_BLOCK, BlockManager
from dsv3.serving.params import SamplingParams
from dsv3.serving.request import Sequence


def seq(tokens, name="a") -> Sequence:
    return Sequence(name, name, 0, list(tokens), len(tokens), SamplingParams().resolved(), max_model_len=1000)


def compute(bm: BlockManager, s: Sequence, tokens: int) -> None:
    assert bm.allocate(s, tokens)
    s.num_computed_tokens += tokens
    bm.cache_full_blocks(s)


def test_allocation_never_hands_out_the_scratch_block_and_frees_everything():
    bm = BlockManager(num_blocks=5, block_size=4)
    s = seq(range(16))
    assert bm.allocate(s, 16)
    assert len(s.block_table) == 4 and SCRATCH_BLOCK not in s.block_table
    assert bm.usage == 1.0
    assert not bm.allocate(seq(range(3), "b"), 1)  # nothing left: refused without change
    bm.free_sequence(s)
    assert bm.check_all_free() == [] and bm.usage == 0.0


def test_tables_grow_block_by_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(5))
    compute(bm, s, 5)
    assert len(s.block_table) == 2
    s.token_ids += [7, 8, 9]
    compute(bm, s, 3)  # 8 tokens: still two blocks
    assert len(s.block_table) == 2
    s.token_ids.append(10)
    compute(bm, s, 1)
    assert len(s.block_table) == 3


def test_prefix_hits_share_blocks_and_stop_before_the_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    compute(bm, a, 10)
    assert len(a.block_hashes) == 2  # two full blocks hashed, the third is partial
    blocks, hashes = bm.cached_prefix(list(range(10)) + [99])
    assert blocks == a.block_table[:2] and hashes == a.block_hashes
    blocks, _ = bm.cached_prefix(list(range(8)))  # the last token is always computed
    assert blocks == a.block_table[:1]
    assert bm.cached_prefix([0, 1, 2, 3, 99, 5, 6, 7, 8])[0] == a.block_table[:1]
    assert bm.cached_prefix([1, 1, 2, 3, 4, 5, 6, 7, 8])[0] == []  # the chain starts at the first block
    b = seq(list(range(8)) + [50, 51])
    found, _ = bm.cached_prefix(b.token_ids)
    assert bm.allocate(b, 2, found)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.check_all_free() == []


def test_freed_blocks_keep_their_hash_until_reused_least_recent_first():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = seq([1, 2, 3, 4, 5, 6])
    compute(bm, a, 6)
    held = list(a.block_table)
    bm.free_sequence(a)
    assert bm.cached_prefix([1, 2, 3, 4, 5, 6, 7])[0] == held  # revived after free
    b = seq([9, 9])
    assert bm.allocate(b, 2)
    assert b.block_table[0] not in held  # the never-hashed block goes first
    c = seq([8, 8])
    assert bm.allocate(c, 2)
    assert c.block_table[0] == held[-1]  # then the sequence's last block, its first blocks kept longest
    assert bm.cached_prefix([1, 2, 3, 4, 5, 6, 7])[0] == held[:2]


def test_revived_blocks_count_against_the_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4])
    compute(bm, a, 4)
    bm.free_sequence(a)
    b = seq([1, 2, 3, 4, 5])
    found, _ = bm.cached_prefix(b.token_ids)
    assert len(found) == 2
    assert not bm.allocate(b, 1, found)  # two revived + one new > two free
    assert bm.check_all_free() == []


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4])
    compute(bm, a, 4)
    assert bm.cached_prefix([1, 2, 3, 4, 5]) == ([], [])


def test_too_small_a_pool_is_refused():
    with pytest.raises(Dsv3Error, match="at least 2 blocks"):
        BlockManager(num_blocks=1, block_size=4)
