"""The model over a paged cache: token-by-token decode, chunked prefill and mixed batches equal one
whole-sequence forward, through shuffled, non-contiguous blocks.

A tiny synthetic model (configs/tiny.yaml, random weights) in fp32 on the reference backend, so
that every comparison is exact up to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch
from dsv3.backends.interface import PagedBatch

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.model import ForwardBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BLOCK = 4
MAX_LEN = 40


@pytest.fixture(scope="module")
def model():
    return dsv3.load_model("tiny", backend="reference", precision="fp32", max_model_len=MAX_LEN, cache_tokens=256,
                           block_size=BLOCK, seed=7, quiet=True)


def random_tokens(model, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (length,), generator=generator).tolist()


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((actual.double() - expected.double()).norm() / expected.double().norm()) <= tolerance


def shuffled_tables(count: int, blocks_each: int, seed: int) -> list[list[int]]:
    """Distinct, non-contiguous blocks (never block 0) for each sequence."""
    order = (torch.randperm(count * blocks_each, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    return [order[i * blocks_each:(i + 1) * blocks_each] for i in range(count)]


def paged(tables: list[list[int]], seq_lens: list[int], query_lens: list[int]) -> PagedBatch:
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(block_tables, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
                      max(query_lens), max(seq_lens))


def run(model, decodes, prefills) -> torch.Tensor:
    """decodes: (table, tokens so far incl. the new one); prefills: (table, tokens so far, chunk length).
    Returns the logits of every new token, decodes first."""
    tokens, positions = [], []
    for _, seq in decodes:
        tokens.append(seq[-1])
        positions.append(len(seq) - 1)
    for _, seq, n in prefills:
        tokens += seq[-n:]
        positions += range(len(seq) - n, len(seq))
    decode = paged([t for t, _ in decodes], [len(s) for _, s in decodes], [1] * len(decodes)) if decodes else None
    prefill = paged([t for t, _, _ in prefills], [len(s) for _, s, _ in prefills],
                    [n for _, _, n in prefills]) if prefills else None
    batch = ForwardBatch(torch.tensor(tokens), torch.tensor(positions), len(decodes), decode, prefill)
    return model.transformer.forward(batch)


def test_token_by_token_decode_equals_whole_sequence(model):
    a, b = random_tokens(model, 24, seed=1), random_tokens(model, 17, seed=2)  # b ends one past a block
    whole_a, whole_b = model.logits(torch.tensor([a]))[0], model.logits(torch.tensor([b]))[0]
    ta, tb = shuffled_tables(2, MAX_LEN // BLOCK, seed=3)
    steps = [run(model, [], [(ta, a[:1], 1)]), run(model, [], [(tb, b[:1], 1)])]
    assert close(steps[0][0], whole_a[0]) and close(steps[1][0], whole_b[0])
    got_a, got_b = [], []
    for position in range(1, len(a)):
        decodes = [(ta, a[:position + 1])] + ([(tb, b[:position + 1])] if position < len(b) else [])
        logits = run(model, decodes, [])
        got_a.append(logits[0])
        if position < len(b):
            got_b.append(logits[1])
    assert close(torch.stack(got_a), whole_a[1:])
    assert close(torch.stack(got_b), whole_b[1:])


def test_chunked_prefill_after_a_cached_prefix_equals_one_prefill(model):
    tokens = random_tokens(model, 30, seed=5)
    whole = model.logits(torch.tensor([tokens]))[0]
    (table,) = shuffled_tables(1, 8, seed=6)
    chunks = [run(model, [], [(table, tokens[:end], end - start)]) for start, end in ((0, 8), (8, 11), (11, 30))]
    assert close(torch.cat(chunks), whole)


def test_mixed_batch_of_decodes_and_prefill_chunks_equals_each_alone(model):
    """Two sequences decode while two others prefill (one a second chunk) in one forward; one block is
    shared by two sequences (a common prefix)."""
    seqs = [random_tokens(model, n, seed=10 + n) for n in (9, 16, 13, 21)]
    seqs[3][:BLOCK] = seqs[2][:BLOCK]  # the first block's tokens in common
    whole = [model.logits(torch.tensor([s]))[0] for s in seqs]
    tables = shuffled_tables(4, 6, seed=11)
    tables[3][0] = tables[2][0]
    run(model, [], [(tables[0], seqs[0][:8], 8), (tables[1], seqs[1][:15], 15), (tables[2], seqs[2][:BLOCK], BLOCK),
                    (tables[3], seqs[3][:BLOCK], BLOCK)])  # fill the caches up to where the mixed step starts
    run(model, [], [(tables[2], seqs[2][:6], 2), (tables[3], seqs[3][:10], 6)])
    logits = run(model, [(tables[0], seqs[0]), (tables[1], seqs[1])],
                 [(tables[2], seqs[2], 7), (tables[3], seqs[3], 11)])
    assert close(logits[0], whole[0][-1]) and close(logits[1], whole[1][-1])
    assert close(logits[2:9], whole[2][6:]) and close(logits[9:], whole[3][10:])


def test_bf16_decode_follows_the_whole_sequence():
    model = dsv3.load_model("tiny", backend="reference", precision="bf16", max_model_len=32, cache_tokens=64,
                            block_size=BLOCK, seed=7, quiet=True)
    tokens = random_tokens(model, 20, seed=8)
    whole = model.logits(torch.tensor([tokens]))[0]
    (table,) = shuffled_tables(1, 5, seed=9)
    steps = [run(model, [], [(table, tokens[:1], 1)])[0]]
    steps += [run(model, [(table, tokens[:p + 1])], [])[0] for p in range(1, len(tokens))]
    assert close(torch.stack(steps), whole, tolerance=2e-2)


def test_logits_leave_the_engine_cache_alone(model):
    caches = [c.clone() for c in model.transformer.caches]
    model.logits(torch.tensor([random_tokens(model, 12, seed=12)]))
    assert all(torch.equal(a, b) for a, b in zip(caches, model.transformer.caches, strict=True))


@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(1, MAX_LEN + 1, dtype=torch.long), "max_model_len"),
    (torch.tensor([[5, 512]]), "512"),
    (torch.tensor([[5, -1]]), "-1"),
    (torch.tensor([[1.0, 2.0]]), "integer"),
    ([[5, 6], [7]], "equal length"),
])
def test_logits_refuse_bad_tokens(model, tokens, message):
    with pytest.raises((Dsv3Error, TypeError), match=message):
        model.logits(tokens)


def test_a_string_is_one_prompt(model):
    """Issue 18: a str is one prompt, never one prompt per character (here: no tokenizer, so refused)."""
    with pytest.raises(Dsv3Error, match="no tokenizer"):
        model.generate("hello")
