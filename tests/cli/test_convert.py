"""`dsv3 convert`: FP8 -> BF16 and e4m3fn -> e4m3fnuz, streamed and all-or-nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dsv3.backends import fp8
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

import dsv3.convert
from dsv3.api import load_model
from dsv3.checkpoint import INDEX_FILE, CheckpointSource, RandomSource, save_checkpoint
from dsv3.cli import main
from dsv3.config import load_config
from dsv3.convert import convert_checkpoint
from dsv3.errors import CheckpointError

SPECIAL_WEIGHT = "model.layers.0.self_attn.q_a_proj.weight"


def write_tokenizer(directory: Path) -> None:
    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (directory / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))


def every_fp8_bit_pattern(shape: tuple[int, ...]) -> torch.Tensor:
    """An e4m3fn tensor holding every finite bit pattern, 0x80 (negative zero) several times."""
    bits = torch.arange(256, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x80  # the NaN patterns 0x7F and 0xFF become -0
    return bits.repeat(shape[0] * shape[1] // 256 + 1)[: shape[0] * shape[1]].view(shape).view(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> Path:
    """The tiny config with random FP8 weights in several shards, and tokenizer files."""
    config = load_config("tiny")
    source = RandomSource(config, fp8=True, seed=3)
    tensors = {name: source.get(name) for name in sorted(source.names())}
    tensors[SPECIAL_WEIGHT] = every_fp8_bit_pattern(tuple(tensors[SPECIAL_WEIGHT].shape))
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(tokenizer_dir)
    path = tmp_path_factory.mktemp("ckpt") / "fp8"
    return save_checkpoint(path, tensors, config.to_dict(), tokenizer_dir=tokenizer_dir, max_shard_bytes=1 << 20)


@pytest.fixture(scope="module")
def bf16_checkpoint(fp8_checkpoint, tmp_path_factory) -> Path:
    return convert_checkpoint(fp8_checkpoint, tmp_path_factory.mktemp("out") / "bf16", progress=False)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    source = CheckpointSource(path)
    return {name: source.get(name) for name in source.names()}


def test_bf16_checkpoint_layout(fp8_checkpoint, bf16_checkpoint):
    source, converted = read_all(fp8_checkpoint), read_all(bf16_checkpoint)
    scales = {n for n in source if n.endswith("weight_scale_inv")}
    assert scales and set(converted) == set(source) - scales
    for name, tensor in converted.items():
        if source[name].dtype == torch.float8_e4m3fn:
            assert tensor.dtype == torch.bfloat16
            want = fp8.dequantize_blocks(source[name], source[name + "_scale_inv"], torch.bfloat16)
            assert torch.equal(tensor, want), name
        else:
            assert tensor.dtype == source[name].dtype and torch.equal(tensor, source[name]), name
    index = json.loads((bf16_checkpoint / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in converted.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(bf16_checkpoint / shard), "pt") as f:
            assert name in f.keys()
    config = json.loads((bf16_checkpoint / "config.json").read_text())
    original = json.loads((fp8_checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {k: v for k, v in original.items() if k != "quantization_config"}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (bf16_checkpoint / name).read_bytes() == (fp8_checkpoint / name).read_bytes()


def test_fp8_checkpoint_run_in_bf16_matches_its_converted_copy(fp8_checkpoint, bf16_checkpoint):
    from_fp8 = load_model(fp8_checkpoint, backend="reference", precision="bf16", quiet=True, progress=False)
    from_bf16 = load_model(bf16_checkpoint, backend="reference", precision="bf16", quiet=True, progress=False)
    assert from_fp8.tokenizer is not None and from_bf16.tokenizer is not None
    for a, b in zip(from_fp8.transformer.layers, from_bf16.transformer.layers):
        for x, y in zip(a.attn.qkv_a_proj.linears, b.attn.qkv_a_proj.linears, strict=True):
            assert torch.equal(x.weight.weight, y.weight.weight)
        for name in ("q_b_proj", "o_proj"):
            assert torch.equal(getattr(a.attn, name).weight.weight, getattr(b.attn, name).weight.weight), name
        for part in ("w_uk", "w_uv"):
            assert torch.equal(getattr(a.attn.absorbed, part), getattr(b.attn.absorbed, part)), part
    experts_fp8, experts_bf16 = from_fp8.transformer.layers[2].ffn.experts, from_bf16.transformer.layers[2].ffn.experts
    assert torch.equal(experts_fp8.gate_up, experts_bf16.gate_up) and torch.equal(experts_fp8.down, experts_bf16.down)
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_fp8.logits(tokens), from_bf16.logits(tokens))
    prompts = [[0, 5, 9, 13], [0, 7]]
    assert from_fp8.greedy_tokens(prompts, 8) == from_bf16.greedy_tokens(prompts, 8)


def test_converted_checkpoint_reads_with_transformers(bf16_checkpoint):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(str(bf16_checkpoint))
    assert isinstance(config, transformers.DeepseekV3Config)
    assert getattr(config, "quantization_config", None) is None
    assert (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) == (128, 3, 8)
    direct = transformers.DeepseekV3Config.from_pretrained(str(bf16_checkpoint))
    assert direct.kv_lora_rank == 64


def test_fn_to_fnuz_values_equal_after_scale_doubling(fp8_checkpoint, tmp_path):
    out = convert_checkpoint(fp8_checkpoint, tmp_path / "fnuz", to="e4m3fnuz", progress=False)
    source, converted = read_all(fp8_checkpoint), dict()
    with open(out / INDEX_FILE) as f:
        for name, shard in json.load(f)["weight_map"].items():
            with safe_open(str(out / shard), "pt") as handle:
                converted[name] = handle.get_tensor(name)
    assert set(converted) == set(source)
    for name, weight in source.items():
        if weight.dtype != torch.float8_e4m3fn:
            continue
        new_weight, new_scale = converted[name], converted[name + "_scale_inv"]
        assert new_weight.dtype == torch.float8_e4m3fnuz
        assert torch.equal(new_scale, source[name + "_scale_inv"] * 2)
        values = fp8.dequantize_blocks(new_weight, new_scale, torch.float32)
        assert not values.isnan().any(), name
        assert torch.equal(values, fp8.dequantize_blocks(weight, source[name + "_scale_inv"], torch.float32)), name
    negative_zero = source[SPECIAL_WEIGHT].view(torch.uint8) == 0x80
    assert negative_zero.sum() >= 3
    assert (converted[SPECIAL_WEIGHT].view(torch.uint8)[negative_zero] == 0).all()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["fmt"] == "e4m3fnuz"


def test_fnuz_checkpoint_loads_as_the_one_it_came_from(fp8_checkpoint, tmp_path):
    """An MI300X owner's converted files run anywhere: read back as e4m3fn, the same model."""
    out = convert_checkpoint(fp8_checkpoint, tmp_path / "fnuz", to="e4m3fnuz", progress=False)
    original, reread = read_all(fp8_checkpoint), read_all(out)
    source = CheckpointSource(out)
    for name, tensor in original.items():
        assert source.meta(name) == (tuple(tensor.shape), tensor.dtype), name
        assert reread[name].dtype == tensor.dtype, name
        if tensor.dtype == torch.float8_e4m3fn:  # bits equal but for -0, which fnuz cannot hold
            assert torch.equal(reread[name].float(), tensor.float()), name
        else:
            assert torch.equal(reread[name], tensor), name
    assert torch.equal(source.get_slice(SPECIAL_WEIGHT, 0, 3, 7).float(), original[SPECIAL_WEIGHT][3:7].float())
    scale = SPECIAL_WEIGHT + "_scale_inv"
    assert torch.equal(source.get_slice(scale, 1, 0, 1), original[scale][:, :1])
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    for precision in ("fp8", "bf16"):
        theirs = load_model(fp8_checkpoint, backend="reference", precision=precision, quiet=True, progress=False)
        ours = load_model(out, backend="reference", precision=precision, quiet=True, progress=False)
        assert torch.equal(ours.logits(tokens), theirs.logits(tokens)), precision


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, calls: int, seen: list[list[str]]):
    """Make the conversion stop (as Ctrl-C would) after `calls` FP8 tensors, noting what was on disk then."""
    convert = dsv3.convert._convert
    count = [0]

    def failing(name, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt
        return convert(name, *args, **kwargs)

    def flush_then_record(writer_flush):
        def flush(self):
            writer_flush(self)
            seen.append(sorted(p.name for p in self.directory.iterdir()))
        return flush

    monkeypatch.setattr(dsv3.convert, "_convert", failing)
    monkeypatch.setattr(dsv3.convert.ShardWriter, "_flush", flush_then_record(dsv3.convert.ShardWriter._flush))


def test_interrupted_conversion_leaves_no_output(fp8_checkpoint, tmp_path, monkeypatch):
    seen: list[list[str]] = []
    interrupt_after(monkeypatch, 60, seen)
    with pytest.raises(Interrupt):
        convert_checkpoint(fp8_checkpoint, tmp_path / "out", max_shard_bytes=64 << 10, progress=False)
    assert any(any(n.endswith(".safetensors") for n in names) for names in seen), "shards were half written"
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_output(fp8_checkpoint, tmp_path, monkeypatch):
    old = tmp_path / "out"
    old.mkdir()
    (old / "config.json").write_text("{}")  # --overwrite replaces only a checkpoint directory
    (old / "model.safetensors").write_text("previous conversion")
    interrupt_after(monkeypatch, 30, [])
    with pytest.raises(Interrupt):
        convert_checkpoint(fp8_checkpoint, old, overwrite=True, max_shard_bytes=64 << 10, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (old / "model.safetensors").read_text() == "previous conversion"


def test_fp8_weight_without_scale_is_named(tmp_path):
    config = load_config("tiny")
    source = RandomSource(config, fp8=True)
    tensors = {name: source.get(name) for name in source.names()}
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    bad = save_checkpoint(tmp_path / "bad", tensors, config.to_dict())
    with pytest.raises(CheckpointError, match="FP8 tensor model.layers.1.mlp.experts.3.up_proj.weight has no "
                                              "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_convert_and_its_errors(fp8_checkpoint, bf16_checkpoint, tmp_path, capsys):
    assert main(["convert", str(fp8_checkpoint), str(tmp_path / "cli"), "--quiet", "--max-shard-size", "0.001"]) == 0
    assert len(list((tmp_path / "cli").glob("model-*-of-*.safetensors"))) > 1
    assert main(["convert", str(fp8_checkpoint), str(tmp_path / "cli"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(bf16_checkpoint), str(tmp_path / "again"), "--quiet"]) == 2
    assert "nothing to convert" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1
