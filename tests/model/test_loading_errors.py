"""A broken checkpoint or config is one clear error naming the file, tensor or field, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import hf_helpers as hf
import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
import dsv3.api
from dsv3.checkpoint import INDEX_FILE
from dsv3.errors import CheckpointError, ConfigError, Dsv3Error

REPO = Path(__file__).resolve().parents[2]
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A valid FP8 checkpoint (V3 layout, 2 layers, several shards)."""
    config = {**hf.official_config("v3", num_hidden_layers=2), **hf.FP8_SHAPES}
    model = hf.build_hf_model(config, seed=1)
    return hf.save_official(tmp_path_factory.mktemp("good") / "ckpt", hf.official_tensors(model), config, "fp8",
                            max_shard_bytes=256 << 10)


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path) -> Path:
    """A fresh copy of the valid checkpoint, for one test to break."""
    return Path(shutil.copytree(good_checkpoint, tmp_path / "ckpt"))


def load(path):
    return dsv3.load_model(path, backend="reference", precision="bf16", max_seq_len=64, quiet=True)


def load_error(path, kind: type[Dsv3Error] = CheckpointError) -> str:
    """The one-line message of the error loading `path` raises."""
    with pytest.raises(kind) as error:
        load(path)
    message = str(error.value)
    assert "\n" not in message
    return message


def index_of(path: Path) -> dict:
    return json.loads((path / INDEX_FILE).read_text())


def edit_shard(path: Path, tensor: str, change) -> Path:
    """Rewrite the shard holding `tensor` after change(tensors dict, weight_map) edits it in place."""
    index = index_of(path)
    shard = path / index["weight_map"][tensor]
    tensors = load_file(str(shard))
    change(tensors, index["weight_map"], shard.name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps(index))
    return shard


def test_the_unbroken_checkpoint_loads(checkpoint):
    model = load(checkpoint)
    assert model.logits(torch.tensor([[3, 4, 5]])).isfinite().all()


def test_single_file_checkpoint_without_index(checkpoint):
    """model.safetensors alone (no index) loads; its truncation is named too."""
    merged = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
        shard.unlink()
    (checkpoint / INDEX_FILE).unlink()
    single = checkpoint / "model.safetensors"
    save_file(merged, str(single), metadata={"format": "pt"})
    assert load(checkpoint).logits(torch.tensor([[3, 4]])).isfinite().all()
    single.write_bytes(single.read_bytes()[:-64])
    assert "model.safetensors" in load_error(checkpoint)


def test_no_weights_at_all(checkpoint):
    for shard in checkpoint.glob("*.safetensors"):
        shard.unlink()
    (checkpoint / INDEX_FILE).unlink()
    assert "no model.safetensors.index.json and no *.safetensors" in load_error(checkpoint)


@pytest.mark.parametrize("keep", ["most", "header"])
def test_truncated_shard(checkpoint, keep):
    shard = checkpoint / index_of(checkpoint)["weight_map"][KV_B]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if keep == "most" else data[:20])
    message = load_error(checkpoint)
    assert shard.name in message


def test_index_naming_a_missing_shard(checkpoint):
    shard = checkpoint / index_of(checkpoint)["weight_map"][KV_B]
    shard.unlink()
    message = load_error(checkpoint)
    assert INDEX_FILE in message and shard.name in message and "does not exist" in message


def test_index_that_is_not_json(checkpoint):
    (checkpoint / INDEX_FILE).write_text("{ not json")
    assert INDEX_FILE in load_error(checkpoint)


def test_missing_tensor(checkpoint):
    def drop(tensors, weight_map, shard):
        del tensors[KV_B], weight_map[KV_B]
    edit_shard(checkpoint, KV_B, drop)
    message = load_error(checkpoint)
    assert f"missing tensor {KV_B}" in message


def test_tensor_the_index_names_but_the_shard_lacks(checkpoint):
    def drop(tensors, weight_map, shard):
        del tensors[KV_B]
    shard = edit_shard(checkpoint, KV_B, drop)
    message = load_error(checkpoint)
    assert KV_B in message and shard.name in message


def test_wrong_shape(checkpoint):
    def shrink(tensors, weight_map, shard):
        tensors[KV_B] = tensors[KV_B][:-1].clone()
    edit_shard(checkpoint, KV_B, shrink)
    message = load_error(checkpoint)
    assert KV_B in message and "[255, 96]" in message and "expected [256, 96]" in message


@pytest.mark.parametrize("tensor, dtype, expected", [
    (KV_B, torch.int32, "int32"),
    ("model.norm.weight", torch.int8, "int8"),
    ("model.layers.1.mlp.gate.e_score_correction_bias", torch.bfloat16, "expected float32"),
])
def test_wrong_dtype(checkpoint, tensor, dtype, expected):
    def cast(tensors, weight_map, shard):
        tensors[tensor] = tensors[tensor].float().to(dtype)
    edit_shard(checkpoint, tensor, cast)
    message = load_error(checkpoint)
    assert tensor in message and expected in message


def test_unexpected_tensor(checkpoint):
    extra = "model.layers.1.self_attn.rotary_emb.inv_freq"

    def add(tensors, weight_map, shard):
        tensors[extra] = torch.ones(4)
        weight_map[extra] = shard
    edit_shard(checkpoint, KV_B, add)
    message = load_error(checkpoint)
    assert f"unexpected tensor {extra}" in message


def test_missing_weight_scale_inv(checkpoint):
    scale = KV_B.removesuffix("weight") + "weight_scale_inv"

    def drop(tensors, weight_map, shard):
        del tensors[scale], weight_map[scale]
    edit_shard(checkpoint, scale, drop)
    message = load_error(checkpoint)
    assert KV_B in message and scale in message


def test_misshaped_weight_scale_inv(checkpoint):
    scale = KV_B.removesuffix("weight") + "weight_scale_inv"

    def grow(tensors, weight_map, shard):
        tensors[scale] = torch.ones(3, 1)
    edit_shard(checkpoint, scale, grow)
    message = load_error(checkpoint)
    assert scale in message and "[3, 1]" in message and "[2, 1]" in message


def test_config_that_does_not_match_the_weights(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = load_error(checkpoint)
    assert "unexpected tensor model.layers.1." in message


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0),
    ("hidden_size", -64),
    ("vocab_size", "96"),
    ("qk_rope_head_dim", 15),
    ("topk_group", 5),
    ("n_group", 3),
    ("num_experts_per_tok", 9),
    ("first_k_dense_replace", 3),
    ("rms_norm_eps", 0),
    ("scoring_func", "relu"),
    ("topk_method", "random"),
    ("routed_scaling_factor", -1.0),
    ("rope_scaling", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 0}),
    ("rope_scaling", {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 0}),
    ("rope_scaling", {"type": "linear", "factor": 8.0}),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [64, 64]}),
    ("eos_token_id", "</s>"),
])
def test_config_field_out_of_range(checkpoint, field, value):
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = load_error(checkpoint, ConfigError)
    assert "config.json" in message and f"field {field!r}" in message


def test_checkpoint_directory_without_config(checkpoint):
    (checkpoint / "config.json").unlink()
    assert str(checkpoint) in load_error(checkpoint, ConfigError)


# ---- the command --------------------------------------------------------------------------------

def run_generate(checkpoint: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3", "generate", "--ckpt", str(checkpoint), *options, "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_command_prints_one_line_and_exits_2(checkpoint):
    def shrink(tensors, weight_map, shard):
        tensors[KV_B] = tensors[KV_B][:-1].clone()
    edit_shard(checkpoint, KV_B, shrink)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # generate checks the tokenizer before the weights
        shutil.copy(dsv3.api.TINY_CHECKPOINT / name, checkpoint / name)
    quiet = run_generate(checkpoint, "--quiet", "--backend", "reference")
    assert quiet.returncode == 2
    assert quiet.stdout == ""
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3: error:") and KV_B in lines[0]

    verbose = run_generate(checkpoint, "--backend", "reference")  # status lines first, then the error
    assert verbose.returncode == 2
    assert "Traceback" not in verbose.stderr
    assert [line for line in verbose.stderr.splitlines() if "error" in line] == lines
