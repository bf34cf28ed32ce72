"""MTP speculative decoding on CUDA, where verify steps replay the chunk-row recordings of (batch, k + 1)
buckets and the MTP module's draft step (cache fill through decode rows, greedy proposals) replays its own
recordings: greedy tokens as the plain engine's on the
same GPU, drafts accepted on the tiny checkpoint's own text, every block back. Skipped without an NVIDIA GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.cuda]

PROMPTS = ["A mixture of experts", "Once upon a time", "The", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend chips"]


def _tiny(**options):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dsv3.api import load_model

    return load_model(backend="cuda", precision="fp32", max_model_len=256, cache_tokens=4096, block_size=64,
                      max_num_seqs=8, quiet=True, progress=False, **options)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_tokens_as_the_plain_engine_on_cuda(k):
    from dsv3.serving.params import SamplingParams

    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    plain, fast = _tiny(), _tiny(speculative_config={"method": "mtp", "num_speculative_tokens": k})
    assert fast.engine.runner.graphs and fast.engine.proposer.rows_as_decode  # the recorded path under test
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params)]
    got = [o.outputs[0].token_ids for o in fast.generate(PROMPTS, params)]
    for prompt, a, b in zip(PROMPTS, want, got, strict=True):
        parted = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if parted is None:
            continue
        ids = plain.tokenizer.encode(prompt)  # where they part, the plain engine's top two logits must tie
        row = plain.logits(torch.tensor([ids + a[:parted]], device="cuda"))[0, -1]
        top2 = row.topk(2).values
        assert ((top2[0] - top2[1]) / row.abs().max()).item() < 1e-4, f"{prompt!r}: tokens part at {parted}"
    stats = fast.engine.stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0.2 * stats.num_draft_tokens
    recordings = fast.engine.proposer.recordings  # greedy drafts replayed CUDA graphs, none declined
    assert recordings.enabled and any(drafting for _, drafting in recordings.recorded)
    assert fast.engine.block_manager.check_all_free() == []
    plain.shutdown()
    fast.shutdown()
