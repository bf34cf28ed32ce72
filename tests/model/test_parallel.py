"""Tensor and expert parallelism on the CPU with gloo: 2 and 4 processes against one process.

Each world size runs once (forked processes, which start in about a second where
spawned ones take ~15 s on a 2-core CPU), loading every case in turn; the tests
then compare each case with the single-process model loaded here. Cases: the
tiny config (4 heads, 8 experts; FP8 checkpoint) in fp32 and bf16, and a tiny
config with 16 experts whose slices fall on 128 boundaries, in fp8 and bf16;
each with TP alone, EP alone and both.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint import RandomSource, save_checkpoint
from dsv3.config import ModelConfig, load_config
from dsv3.errors import Dsv3Error

pytestmark = pytest.mark.distributed

PROMPTS = [[5, 17, 99, 3], [200, 7]]
NEW_TOKENS = 5
TOKENS = torch.tensor([[3, 141, 59, 265, 35, 89, 79], [323, 84, 62, 64, 33, 83, 279]])
LOAD = dict(backend="reference", quiet=True, max_batch_size=2, max_seq_len=32)


def tiny16_config() -> ModelConfig:
    """A tiny model with 16 experts whose every FP8 cut falls on 128 rows or columns up to 4 ranks."""
    return load_config("tiny").replace(
        hidden_size=256, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=64, v_head_dim=128, intermediate_size=512, moe_intermediate_size=512,
        n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=2, num_nextn_predict_layers=0)


def write_checkpoint(path: Path, config: ModelConfig) -> Path:
    source = RandomSource(config, fp8=True, seed=3)
    return save_checkpoint(path, {name: source.get(name) for name in sorted(source.names())}, config.to_dict())


CASES = {  # world size -> (checkpoint, precision, tp, ep)
    2: [("tiny", "fp32", 2, 1), ("tiny", "fp32", 1, 2), ("tiny", "fp32", 2, 2), ("tiny", "bf16", 2, 2),
        ("tiny16", "fp8", 2, 1), ("tiny16", "fp8", 1, 2), ("tiny16", "fp8", 2, 2), ("tiny16", "bf16", 1, 2),
        ("synthetic16", "fp32", 2, 2)],
    4: [("tiny", "fp32", 4, 1), ("tiny", "fp32", 1, 4), ("tiny", "fp32", 4, 4), ("tiny", "fp32", 2, 2),
        ("tiny", "bf16", 4, 4), ("tiny16", "fp8", 4, 1), ("tiny16", "fp8", 4, 4), ("tiny16", "fp8", 2, 2)],
}


# ---- the worker processes ---------------------------------------------------------------------

class ReadCounter:
    """Counts tensor reads from checkpoints (get and get_slice) in this process."""

    def __init__(self):
        from dsv3.checkpoint import CheckpointSource
        self.count = 0
        for method in ("get", "get_slice"):
            original = getattr(CheckpointSource, method)
            setattr(CheckpointSource, method, self._counting(original))

    def _counting(self, original):
        def read(source, *args):
            self.count += 1
            return original(source, *args)
        return read


def _expect_error(load) -> str:
    try:
        load()
    except Dsv3Error as e:
        return str(e)
    return "no error"


def _worker(rank: int, world: int, port: int, checkpoints: dict, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dsv3.api import load_model
    try:
        results = {}
        for name, precision, tp, ep in CASES[world]:
            model = load_model(checkpoints[name], precision=precision, tp=tp, ep=ep, **LOAD)
            if rank == 0:  # rank 0 drives the engine; every other rank runs its steps until it shuts down
                results[name, precision, tp, ep] = (model.logits(TOKENS), model.greedy_tokens(PROMPTS, NEW_TOKENS))
                model.shutdown()
            else:
                model.serve_steps()
        errors = {}
        if world == 2:
            reads = ReadCounter()
            errors["fp8 cut inside a block"] = (
                _expect_error(lambda: load_model(checkpoints["tiny"], precision="fp8", tp=2, ep=2, **LOAD)),
                reads.count)
            mine = checkpoints["tiny16" if rank == 1 else "tiny"]
            errors["different checkpoints"] = (
                _expect_error(lambda: load_model(mine, precision="fp32", **LOAD)), reads.count)
            errors["different precision"] = (_expect_error(lambda: load_model(
                checkpoints["tiny"], precision="bf16" if rank == 1 else "fp32", **LOAD)), reads.count)
            from dsv3.backends.interface import MemoryInfo
            from dsv3.backends.reference import ReferenceBackend
            saved = ReferenceBackend.memory_info
            if rank == 1:  # rank 1's device claims 1 MiB free; rank 0 has no accelerator to check
                ReferenceBackend.memory_info = lambda self, reset_peak=False: MemoryInfo(
                    total=1 << 30, free=1 << 20, allocated=0, peak=0, accelerator=True)
            try:
                errors["too little memory"] = (_expect_error(lambda: load_model(
                    checkpoints["tiny"], precision="fp32", **LOAD)), reads.count)
            finally:
                ReferenceBackend.memory_info = saved
        torch.save({"results": results, "errors": errors}, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.failed").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, checkpoints, out: Path, timeout: float = 150, worker=None) -> list[dict]:
    """Run `worker` (_worker by default) on `world` forked processes as worker(rank, world, port, checkpoints,
    out); every rank's saved results, in rank order."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    port = _free_port()
    processes = [context.Process(target=worker or _worker, args=(rank, world, port, checkpoints, out))
                 for rank in range(world)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(deadline - time.monotonic(), 0))
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    failures = [f.read_text() for f in sorted(out.glob("*.failed"))]
    assert not hung and not failures and all(p.exitcode == 0 for p in processes), (
        f"{len(hung)} ranks hung; exit codes {[p.exitcode for p in processes]}\n" + "\n".join(failures))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    return {"tiny": str(write_checkpoint(root / "tiny", load_config("tiny"))),
            "tiny16": str(write_checkpoint(root / "tiny16", tiny16_config())),
            "synthetic16": tiny16_config()}  # no checkpoint: every rank makes its slices of the same weights


@pytest.fixture(scope="module")
def worlds(checkpoints, tmp_path_factory) -> dict:
    """world size -> every rank's results (each world runs once, on first use)."""
    cache = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_world(world, checkpoints, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]
    return get


@pytest.fixture(scope="module")
def single(checkpoints) -> dict:
    """(checkpoint, precision) -> (model, logits, greedy tokens) of one process."""
    from dsv3.api import load_model
    cache = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            model = load_model(checkpoints[name], precision=precision, **LOAD)
            cache[name, precision] = (model, model.logits(TOKENS), model.greedy_tokens(PROMPTS, NEW_TOKENS))
        return cache[name, precision]
    return get


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per position: largest |logits - reference| as a fraction of the largest |reference| [B, T]."""
    return (logits - reference).abs().amax(dim=-1) / reference.abs().max()


# ---- equality with one process ----------------------------------------------------------------

@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else f"world{v}")
def test_matches_one_process(world, case, worlds, single):
    """fp32: the same logits to 1e-5 and the same greedy tokens, on every rank.

    bf16 and fp8 round partial sums before they are added across ranks, so the logits
    move by rounding noise. Where a token's router is near a tie (random weights have
    group margins of 1e-3) that noise picks other experts and the position's logits
    jump, as they do between bf16 and fp32 in one process; greedy text can then differ.
    So in bf16/fp8 the typical position must stay within the precision's own noise
    (its distance from fp32) and 80% of positions within twice its largest noise.
    """
    ranks = worlds(world)
    name, precision, tp, ep = case
    logits, tokens = ranks[0]["results"][case]
    _, want_logits, want_tokens = single(name, precision)
    assert logits.shape == want_logits.shape
    error = relative_error(logits, want_logits)
    if precision == "fp32":
        assert error.max() <= 1e-5
        assert tokens == want_tokens
        return
    noise = relative_error(want_logits, single(name, "fp32")[1])
    assert error.median() <= noise.median() * 1.5, f"per-position error {error}, noise {noise}"
    assert (error <= 2 * noise.max()).float().mean() >= 0.8, f"per-position error {error}, noise {noise}"


def test_the_fp32_bound_is_far_below_a_wrong_split(single, checkpoints):
    """A rank that used the other rank's half of o_proj would move the logits far beyond 1e-5."""
    model, logits, _ = single("tiny", "fp32")
    o_proj = model.transformer.layers[0].attn.o_proj.weight
    saved = o_proj.weight
    o_proj.weight = torch.cat(saved.chunk(2, dim=1)[::-1], dim=1)  # heads 0-1 and 2-3 swapped
    try:
        assert relative_error(model.logits(TOKENS), logits).max() > 1e-2
    finally:
        o_proj.weight = saved


# ---- errors before any weight is read ---------------------------------------------------------

def test_fp8_cut_inside_a_block_is_refused_before_reading(worlds):
    for result in worlds(2):
        message, reads = result["errors"]["fp8 cut inside a block"]
        assert "q_b_proj.weight [192, 64] would be cut into 96 rows per rank" in message, message
        assert "multiple of the 128-wide FP8 blocks" in message
        assert reads == 0


def test_ranks_that_disagree_are_refused_before_reading(worlds):
    for result in worlds(2):
        message, reads = result["errors"]["different checkpoints"]
        assert message.startswith("ranks disagree on the config: rank 0 has"), message
        assert "rank 1 has" in message and "tiny16" in message
        message, reads_after = result["errors"]["different precision"]
        assert message.startswith("ranks disagree on the precision: rank 0 has 'fp32'"), message
        assert reads == 0 and reads_after == 0


def test_a_rank_without_room_for_its_weights_stops_every_rank_before_reading(worlds):
    for result in worlds(2):
        message, reads = result["errors"]["too little memory"]
        assert message.startswith("this layout puts 2.6 MiB of fp32 weights on each rank, but rank 1's cpu has "
                                  "1.0 MiB free of 1.0 GiB; use more ranks"), message
        assert reads == 0


@pytest.mark.parametrize("world,tp,ep,expected", [
    (4, 3, None, "--tp 3 does not divide the world size 4"),
    (4, None, 0, "--ep must be at least 1"),
    (1, 2, None, "--tp 2 needs 2 processes: launch with torchrun --nproc-per-node 2"),
])
def test_sizes_that_do_not_divide_the_world(monkeypatch, world, tp, ep, expected):
    from dsv3.parallel import plan_for
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Dsv3Error, match=expected.replace("(", r"\(")):
        plan_for(tp, ep)


@pytest.mark.parametrize("default,expected", [("cuda:0", "cuda:3"), ("cuda", "cuda"), ("cpu", "cpu")])
def test_each_rank_builds_its_backend_on_its_own_device(monkeypatch, default, expected):
    """LOCAL_RANK 3 of 8 devices: a backend that picked device 0 itself is rebuilt on device 3."""
    from types import SimpleNamespace

    from dsv3.parallel import ParallelPlan, select_rank_backend
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 8)
    built = []

    def select(requested, device):
        built.append(device)
        return SimpleNamespace(device=torch.device(device or default)), "decision"
    backend, _ = select_rank_backend("auto", None, ParallelPlan(3, 8, 3, 8, 8), select)
    assert str(backend.device) == expected
    assert built == ([None, "cuda:3"] if default == "cuda:0" else [None])
    select_rank_backend("auto", "cuda", ParallelPlan(3, 8, 3, 8, 8), select)
    assert built[-1] == "cuda:3"  # a device named without an index gets LOCAL_RANK's


def test_data_parallel_attention_plans(monkeypatch):
    """dp x tp is the world: dp 2 on 4 ranks puts ranks 0-1 and 2-3 in DP groups of tp 2; experts span all 4."""
    from dsv3.parallel import plan_for
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    plan = plan_for(None, None, dp=2)
    assert (plan.tp, plan.ep, plan.dp, plan.dp_rank, plan.tp_rank) == (2, 4, 2, 1, 1)
    assert plan.describe() == ("4 ranks: 2 data-parallel attention groups, attention/dense/embedding/head split 2 ways "
                               "inside each; routed experts in 4 groups")
    assert plan_for(1, 4, dp=1).dp_rank == 0
    with pytest.raises(Dsv3Error, match="--data-parallel-size 2 x --tensor-parallel-size 1 must equal the number "
                                        "of ranks 4"):
        plan_for(1, None, dp=2)
    with pytest.raises(Dsv3Error, match="--dp 3 does not divide the world size 4"):
        plan_for(None, None, dp=3)


def test_single_process_needs_no_plan(monkeypatch):
    from dsv3.parallel import plan_for
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert plan_for(None, None) is None and plan_for(1, 1) is None


@pytest.mark.parametrize("world,tp,ep,precision,expected", [
    (8, 8, 8, "fp32", "--tp 8: .* has 4 attention heads"),
    (6, 2, 3, "fp32", "--ep 3: .* has 8 routed experts"),
    (6, 2, 2, "fp32", "--ep 2 on 6 ranks: .* has 128 expert columns .*, which 3 ranks cannot share evenly"),
    (4, 4, 4, "fp8", r"--tp with precision fp8: model.layers.0.self_attn.q_b_proj.weight \[192, 64\]"),
    (2, 1, 1, "fp8", r"--ep with precision fp8: model.layers.1.mlp.experts.0.gate_proj.weight \[128, 128\] "
                     "would be cut into 64 rows"),
])
def test_models_that_cannot_be_cut(world, tp, ep, precision, expected):
    from dsv3.parallel import ParallelPlan
    plan = ParallelPlan(rank=0, world_size=world, local_rank=0, tp=tp, ep=ep)
    with pytest.raises(Dsv3Error, match=expected):
        plan.check(load_config("tiny"), precision)


def test_each_rank_reads_only_its_slices(checkpoints):
    """The sharded loader of rank 1 of 2 (tp 2, ep 2) asks for half of every cut tensor and half the experts."""
    from dsv3.checkpoint import CheckpointSource
    from dsv3.parallel import ParallelPlan, ShardedLoader
    config = tiny16_config()
    source = CheckpointSource(checkpoints["tiny16"])
    requests = []
    get, get_slice = source.get, source.get_slice
    source.get = lambda name: requests.append((name, None)) or get(name)
    source.get_slice = lambda name, *cut: requests.append((name, cut)) or get_slice(name, *cut)
    loader = ShardedLoader(source, config, ParallelPlan(rank=1, world_size=2, local_rank=1, tp=2, ep=2), progress=False)
    gate_up, gate_up_scale, down, _ = loader.experts("model.layers.1.mlp", 16)
    assert gate_up.shape == (8, 1024, 256) and gate_up_scale.shape == (8, 8, 2) and down.shape == (8, 256, 512)
    assert {n for n, _ in requests} == {f"model.layers.1.mlp.experts.{e}.{p}.{w}" for e in range(8, 16)
                                        for p in ("gate_proj", "up_proj", "down_proj")
                                        for w in ("weight", "weight_scale_inv")}
    requests.clear()
    weight, scale = loader.linear("model.layers.0.self_attn.o_proj")
    embed = loader.tensor("model.embed_tokens")
    assert requests == [("model.layers.0.self_attn.o_proj.weight", (1, 256, 512)),
                        ("model.layers.0.self_attn.o_proj.weight_scale_inv", (1, 2, 4)),
                        ("model.embed_tokens.weight", (0, 256, 512))]
    full = get("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(weight.view(torch.uint8), full[:, 256:].view(torch.uint8)) and scale.shape == (2, 2)
    assert torch.equal(embed, get("model.embed_tokens.weight")[256:])


def test_a_cut_inside_a_block_is_dequantized_exactly(checkpoints):
    """bf16/fp32 may cut FP8 weights anywhere: the covering blocks are read and dequantized, then cut."""
    from dsv3.backends import fp8

    from dsv3.checkpoint import CheckpointSource
    from dsv3.parallel import ParallelPlan, ShardedLoader
    config = load_config("tiny")
    source = CheckpointSource(checkpoints["tiny"])
    loader = ShardedLoader(source, config, ParallelPlan(rank=1, world_size=2, local_rank=1, tp=2, ep=2), progress=False)
    weight, scale = loader.linear("model.layers.0.self_attn.q_b_proj")  # 192 rows: rank 1 has 96..191
    whole = fp8.dequantize_blocks(source.get("model.layers.0.self_attn.q_b_proj.weight"),
                                  source.get("model.layers.0.self_attn.q_b_proj.weight_scale_inv"), torch.float32)
    assert scale is None and torch.equal(weight, whole[96:])


# ---- the command under torchrun ---------------------------------------------------------------

def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    tokenizer.train_from_iterator(["the model is cut across ranks while it loads"] * 4, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


@pytest.mark.slow
def test_generate_under_torchrun_prints_once_what_one_process_prints(checkpoints, tmp_path, capsys):
    from dsv3.cli import main
    ckpt = Path(checkpoints["tiny"])
    _tokenizer(ckpt)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the model\ncut across ranks\n")
    options = ["generate", "--input-file", str(prompts), "--ckpt", str(ckpt), "--backend", "reference",
               "--precision", "fp32", "--max-new-tokens", "6", "--quiet"]
    assert main(options) == 0
    expected = capsys.readouterr().out
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "dsv3", *options,
                          "--tp", "2", "--ep", "2"],
                         capture_output=True, text=True, timeout=120, env={**environment, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected and len(expected.splitlines()) == 2
