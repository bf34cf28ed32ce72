"""The built-in tiny checkpoint (dsv3/assets/tiny): its layout, its parity with transformers,
and that `dsv3 generate` recites the corpus it was trained on.

Expected text always comes from dsv3/assets/corpus.txt, never from a stored string.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dsv3.backends import fp8

import dsv3
from dsv3 import tensor_specs
from dsv3.api import TINY_CHECKPOINT
from dsv3.checkpoint import CheckpointSource
from dsv3.server.chat_template import ChatTemplate
from dsv3.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

CASES = script.expected_continuations()  # (prompt, continuation, is_chat) from the corpus
PARAGRAPHS = [(p, rest) for p, rest, chat in CASES if not chat]
QUESTIONS = [(q, a) for q, a, chat in CASES if chat]


def dsv3_command(*args: str, stdin: str | None = None, backend: str | None = "reference"):
    """Run `python -m dsv3 ARGS` with DSV3_BACKEND=backend (None: unset, so the machine decides)."""
    env = {k: v for k, v in os.environ.items() if k != "DSV3_BACKEND"}
    if backend is not None:
        env["DSV3_BACKEND"] = backend
    return subprocess.run([sys.executable, "-m", "dsv3", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def first_tokens(tokenizer, prompt: str, continuation: str, count: int) -> str:
    """The text of the first `count` tokens of `continuation`, tokenized as in the corpus."""
    whole = tokenizer.encode(prompt + continuation, add_bos=False)
    head = tokenizer.encode(prompt, add_bos=False)
    assert whole[:len(head)] == head, f"{prompt!r} does not end on a token boundary of the corpus"
    return tokenizer.decode(whole[len(head):][:count])


@pytest.fixture(scope="module")
def models():
    """The shipped checkpoint on the reference backend: default precision (BF16: it only emulates FP8) and FP8."""
    return {"bf16": dsv3.load_model(backend="reference", max_batch_size=16, quiet=True),
            "fp8": dsv3.load_model(backend="reference", precision="fp8", max_batch_size=16, quiet=True)}


def test_checkpoint_is_in_the_official_fp8_layout():
    config = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    c = dsv3.load_config(TINY_CHECKPOINT)
    assert c == dsv3.load_config("tiny")  # configs/tiny.yaml describes the shipped model
    assert c.q_lora_rank and c.rope_scaling["type"] == "yarn" and c.n_group > 1 and c.topk_group < c.n_group
    assert (c.first_k_dense_replace, c.n_shared_experts, c.num_nextn_predict_layers) == (1, 1, 1)
    assert (c.topk_method, c.scoring_func, c.moe_intermediate_size % 128) == ("noaux_tc", "sigmoid", 0)
    source = CheckpointSource(TINY_CHECKPOINT)
    specs = tensor_specs.module_specs(c, include_mtp=True)
    names = set()
    for module, spec in specs.items():
        name = tensor_specs.tensor_name(module)
        shape, dtype = source.meta(name)
        assert shape == spec.shape, name
        if spec.kind == tensor_specs.LINEAR:
            scale = f"{module}.weight_scale_inv"
            assert dtype == torch.float8_e4m3fn, name
            assert source.meta(scale) == (tuple(fp8.num_blocks(n) for n in spec.shape), torch.float32), scale
            names.add(scale)
        else:
            assert dtype == (torch.float32 if spec.kind == tensor_specs.FP32 else torch.bfloat16), name
        names.add(name)
    assert source.names() == names
    assert any(name.startswith(f"model.layers.{c.num_hidden_layers}.") for name in names)  # the MTP module
    bias = source.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().max() > 0  # trained by load balancing, not left at zero
    size = sum(f.stat().st_size for f in TINY_CHECKPOINT.iterdir())
    assert size < 5e6, f"{size / 1e6:.1f} MB"


def test_tokenizer_is_reproduced_by_the_script():
    files = script.tokenizer_files(script.train_tokenizer())
    for name, text in files.items():
        assert (TINY_CHECKPOINT / name).read_text(encoding="utf-8") == text, name
    config = json.loads(files["tokenizer_config.json"])
    assert config["add_bos_token"] is True
    tokenizer = Tokenizer(TINY_CHECKPOINT)
    assert tokenizer.vocab_size == 512 and (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)


def test_logits_match_transformers_on_the_dequantized_weights():
    hf_model, hf_mtp = script.hf_model_from_checkpoint(TINY_CHECKPOINT)
    model = dsv3.load_model(TINY_CHECKPOINT, backend="reference", precision="fp32", load_mtp=True, quiet=True)
    text = PARAGRAPHS[2][0] + PARAGRAPHS[2][1]
    tokens = torch.tensor([model.tokenizer.encode(text)])
    with torch.no_grad():
        hidden = hf_model.model(input_ids=tokens).last_hidden_state
        expected = hf_model.lm_head(hidden)
        expected_mtp = hf_mtp(hf_model, hidden[:, :-1], tokens[:, 1:])
    got = model.logits(tokens)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    got_mtp = model.transformer.mtp_logits(tokens[:, :-1], tokens[:, 1:])
    assert ((got_mtp - expected_mtp).norm() / expected_mtp.norm()).item() < 1e-4
    # the MTP module was trained: it predicts the token after next
    assert (got_mtp[0, :-1].argmax(-1) == tokens[0, 2:]).float().mean() > 0.9


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_greedy_decoding_recites_the_corpus(models, precision):
    model = models[precision]
    assert model.precision == precision
    template = ChatTemplate.load(TINY_CHECKPOINT)
    prompts = [template.render([{"role": "user", "content": q}]) if chat else q for q, _, chat in CASES]
    greedy = dsv3.SamplingParams(max_tokens=300, temperature=0.0)
    outputs = [o.outputs[0].text for o in model.generate(prompts, greedy)]
    for output, (prompt, continuation, _) in zip(outputs, CASES):
        assert output == continuation, prompt


def test_command_uses_the_builtin_checkpoint_and_prints_the_continuation(models):
    prompt, continuation = PARAGRAPHS[0]
    result = dsv3_command("generate", prompt, backend=None)  # exactly what README runs
    assert result.returncode == 0, result.stderr
    assert result.stdout == first_tokens(models["bf16"].tokenizer, prompt, continuation, 64) + "\n"
    assert sum("built-in tiny checkpoint" in line for line in result.stderr.splitlines()) == 1
    if not torch.cuda.is_available():  # a CPU: the reference backend, the FP8 checkpoint run in BF16
        assert "backend reference" in result.stderr and "precision bf16" in result.stderr


def test_command_in_fp8_until_the_end_of_the_paragraph():
    prompt, continuation = PARAGRAPHS[-1]
    result = dsv3_command("generate", prompt, "--precision", "fp8", "--max-new-tokens", "300", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (continuation + "\n", "")


def test_input_file_runs_in_batches_and_chat_formats_questions(tmp_path, models):
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(q for q, _ in QUESTIONS[:3]) + "\n\n")
    result = dsv3_command("generate", "--input-file", str(file), "--chat", "--max-batch-size", "2",
                          "--max-new-tokens", "100", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [q + a for q, a in QUESTIONS[:3]]


def test_interactive_chat_answers_and_clears():
    (q1, a1), (q2, a2) = QUESTIONS[0], QUESTIONS[-1]
    result = dsv3_command("generate", "--interactive", "--max-new-tokens", "100",
                          stdin=f"{q1}\n/clear\n{q2}\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert a1 + "\n" in result.stdout and a2 + "\n" in result.stdout
    assert "(cleared)" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--input-file", "no/such/prompts.txt"], "no/such/prompts.txt"),
    (["a prompt", "--interactive"], "exactly one of"),
    ([], "exactly one of"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    result = dsv3_command("generate", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3: error:") and fragment in lines[0], result.stderr
