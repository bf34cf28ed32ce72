"""Tensor, expert and data parallelism: a DeepSeek model cut across ranks while it loads.

The model in dsv3/model.py knows nothing of ranks. This module builds it with a
per-rank config (its share of the attention heads) and a ShardedLoader that
reads only this rank's slices of each tensor from the checkpoint, then wraps the
layers whose outputs must be combined across ranks (gpt-fast style).

How a world of W ranks is cut (tp and ep each divide W):

- Attention, dense MLPs, embedding and head: tensor parallel over `tp` ranks
  (consecutive ranks form a TP group). q_proj/q_b_proj and kv_b_proj are split
  by heads (rows), o_proj by its input columns (one all-reduce); gate/up by
  rows, down by columns (one all-reduce); embedding and head by vocabulary rows
  (all-reduce of the looked-up rows, all-gather of the logits). Without data
  parallelism the W/tp TP groups are identical replicas running the same tokens;
  with it (dp = W/tp) each TP group is a DP group running its own requests, with
  its own latent cache.
- MoE layers span the whole world. The routed experts form `ep` groups of
  E/ep whole experts (rank r is in expert group r // (W/ep)); inside a group
  each expert is split W/ep ways (gate/up rows, down columns). The shared
  experts are split like a dense MLP over the TP group. Routing is computed
  identically on every rank that sees a token (the gate is replicated); each
  rank runs its experts over every token it sees, pairs routed elsewhere
  weighted 0, so no rank counts tokens on the host and every shape is known
  before the step (a decode step records as a CUDA graph). See ParallelMoE for
  the combine (one all-reduce; under DP an all-gather and a reduce-scatter).

So --tp W --ep W is attention TP with pure expert parallelism (the usual
deployment), --tp W --ep 1 is pure TP, --tp 1 --ep W is pure EP with the
attention replicated, --tp 2 --ep 2 on 4 ranks is a 2 x 2 mesh, and
--dp W --ep W is SGLang's DP attention with expert parallelism.

FP8 weights stay in 128x128 blocks: with precision fp8 every cut must fall on a
multiple of 128 (checked before any weight is read). With bf16/fp32 a cut
inside a block is allowed: the rank reads the blocks that cover its slice and
dequantizes them. kv_b_proj is always dequantized at load, so any cut works.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsv3 import checks, distributed, tensor_specs
from dsv3.backends import fp8
from dsv3.backends.interface import Backend, QuantizedActivation, plain
from dsv3.checkpoint import CheckpointSource, WeightLoader
from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.model import ForwardBatch, MoE, Transformer

ROWS, COLUMNS = 0, 1

#: (module name pattern, dimension cut, "tp" or "expert"); the first match wins.
_CUTS: tuple[tuple[re.Pattern, int, str], ...] = tuple((re.compile(p), d, k) for p, d, k in (
    (r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)$", ROWS, "tp"),
    (r"\.self_attn\.o_proj$", COLUMNS, "tp"),
    (r"\.mlp\.experts\.\d+\.(gate_proj|up_proj)$", ROWS, "expert"),
    (r"\.mlp\.experts\.\d+\.down_proj$", COLUMNS, "expert"),
    (r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)$", ROWS, "tp"),
    (r"\.mlp\.(shared_experts\.)?down_proj$", COLUMNS, "tp"),
    (r"^(model\.embed_tokens|lm_head)$", ROWS, "tp"),
))
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Cut:
    """This rank's part of a tensor: part `index` of `parts` equal slices along `dim`."""

    dim: int
    index: int
    parts: int

    def bounds(self, size: int) -> tuple[int, int]:
        share = size // self.parts
        return self.index * share, (self.index + 1) * share


@dataclass(frozen=True)
class ParallelPlan:
    """How the model is cut and which part this rank holds.

    Attributes:
        rank, world_size: this process and the job.
        local_rank: its accelerator index on the node.
        tp: ranks sharing attention, dense MLPs, embedding and head (one TP group).
        ep: expert groups (each holds n_routed_experts / ep whole experts).
        dp: data-parallel attention groups: 1, or world_size / tp groups of tp ranks, each running its own
            requests (its own tokens and latent cache) through attention, dense layers, embedding and head,
            while the routed experts span the whole world.
    """

    rank: int
    world_size: int
    local_rank: int
    tp: int
    ep: int
    dp: int = 1

    def __post_init__(self):
        if self.dp > 1 and self.dp * self.tp != self.world_size:
            raise Dsv3Error(f"--data-parallel-size {self.dp} x --tensor-parallel-size {self.tp} must equal the "
                            f"number of ranks {self.world_size}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def replica(self) -> int:
        """Which TP group this rank is in (0 .. W/tp - 1): a copy of the attention, or under DP its DP group."""
        return self.rank // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's DP group (0 without data-parallel attention)."""
        return self.replica if self.dp > 1 else 0

    @property
    def expert_tp(self) -> int:
        """Ranks each routed expert is split over."""
        return self.world_size // self.ep

    @property
    def expert_group(self) -> int:
        return self.rank // self.expert_tp

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.world_size == 1:
            return "1 rank: the whole model on one device"
        split = f", each expert split {self.expert_tp} ways" if self.expert_tp > 1 else ""
        if self.dp > 1:
            inside = f", attention/dense/embedding/head split {self.tp} ways inside each" if self.tp > 1 else ""
            return (f"{self.world_size} ranks: {self.dp} data-parallel attention groups{inside}; "
                    f"routed experts in {self.ep} groups{split}")
        replicas = f", {self.world_size // self.tp} replicas" if self.tp < self.world_size else ""
        return (f"{self.world_size} ranks: attention/dense/embedding/head split {self.tp} ways{replicas}; "
                f"routed experts in {self.ep} groups{split}")

    def local_experts(self, num_experts: int) -> range:
        """The routed experts this rank holds (a slice of each when expert_tp > 1)."""
        share = num_experts // self.ep
        return range(self.expert_group * share, (self.expert_group + 1) * share)

    def cut(self, module: str) -> Cut | None:
        """This rank's slice of a module's weight, or None where every rank holds all of it."""
        for pattern, dim, kind in _CUTS:
            if pattern.search(module):
                parts, index = (self.tp, self.tp_rank) if kind == "tp" else (self.expert_tp, self.rank % self.expert_tp)
                return Cut(dim, index, parts) if parts > 1 else None
        return None

    def holds(self, module: str, num_experts: int | None) -> bool:
        """Whether this rank reads any of `module` (false for other groups' routed experts)."""
        match = _EXPERT.search(module)
        return match is None or num_experts is None or int(match.group(1)) in self.local_experts(num_experts)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config this rank's model is built with: its share of the attention heads."""
        return config.replace(num_attention_heads=config.num_attention_heads // self.tp)

    def check(self, config: ModelConfig, precision: str, load_mtp: bool = False) -> None:
        """Raise Dsv3Error where the model cannot be cut this way (before any weight is read)."""
        c, tp = config, self.tp
        where = config.source
        if load_mtp:
            raise Dsv3Error("the MTP module is not supported with tensor/expert parallelism yet (load_mtp=False)")
        tp_option, ep_option = f"--tp {tp}", f"--ep {self.ep}"
        even = [("attention heads (num_attention_heads)", c.num_attention_heads, tp, tp_option),
                ("vocabulary entries (vocab_size)", c.vocab_size, tp, tp_option)]
        if c.n_routed_experts is None or c.first_k_dense_replace > 0:
            even.append(("dense MLP columns (intermediate_size)", c.intermediate_size, tp, tp_option))
        if c.n_routed_experts is not None:
            even.append(("routed experts (n_routed_experts)", c.n_routed_experts, self.ep, ep_option))
            even.append(("expert columns (moe_intermediate_size)", c.moe_intermediate_size, self.expert_tp,
                         f"{ep_option} on {self.world_size} ranks"))
            if c.n_shared_experts:
                even.append(("shared-expert columns (moe_intermediate_size x n_shared_experts)",
                             c.moe_intermediate_size * c.n_shared_experts, tp, tp_option))
        for what, count, parts, option in even:
            if count % parts:
                raise Dsv3Error(f"{option}: {where} has {count} {what}, which {parts} ranks cannot share evenly; "
                                f"choose sizes that divide it")
        if precision == "fp8":
            self._check_fp8_blocks(config)

    def _check_fp8_blocks(self, config: ModelConfig) -> None:
        """With FP8 compute every cut of a linear must fall on a 128 boundary (kv_b_proj is dequantized)."""
        for module, spec in tensor_specs.module_specs(config, include_mtp=False).items():
            cut = self.cut(module)
            if cut is None or spec.kind != tensor_specs.LINEAR or module.endswith("kv_b_proj"):
                continue
            share = spec.shape[cut.dim] // cut.parts
            if share % fp8.BLOCK:
                option = "--ep" if _EXPERT.search(module) else "--tp"
                raise Dsv3Error(
                    f"{option} with precision fp8: {tensor_specs.tensor_name(module)} {list(spec.shape)} would be cut "
                    f"into {share} {'rows' if cut.dim == ROWS else 'columns'} per rank, not a multiple of the "
                    f"{fp8.BLOCK}-wide FP8 blocks (use precision bf16, or fewer ranks per tensor)")


def plan_for(tp: int | None, ep: int | None, dp: int | None = None) -> ParallelPlan | None:
    """The plan for this process from torchrun's environment; None for a single process.

    Args:
        tp, ep: requested sizes; None means the world size (tp: the world size / dp).
        dp: data-parallel attention groups (None or 1: none); dp x tp must be the world size.
    """
    job = distributed.launch()
    world = job.world_size
    if world == 1 and tp in (None, 1) and ep in (None, 1) and dp in (None, 1):
        return None
    dp = 1 if dp is None else dp
    if dp < 1:
        raise Dsv3Error(f"--dp must be at least 1, got {dp}")
    tp = (world // dp if dp > 1 else world) if tp is None else tp
    ep = world if ep is None else ep
    for option, value in (("--dp", dp), ("--tp", tp), ("--ep", ep)):
        if value < 1:
            raise Dsv3Error(f"{option} must be at least 1, got {value}")
        if world == 1 and value > 1:
            raise Dsv3Error(f"{option} {value} needs {value} processes: launch with "
                            f"torchrun --nproc-per-node {value} -m dsv3 ...")
        if world % value:
            raise Dsv3Error(f"{option} {value} does not divide the world size {world} "
                            f"(each of --dp, --tp and --ep must divide the number of processes)")
    return ParallelPlan(job.rank, world, job.local_rank, tp, ep, dp)


def select_rank_backend(requested: str, device: str | None, plan: ParallelPlan, select):
    """Build the backend on this rank's device: LOCAL_RANK's accelerator unless `device` names one.

    The rank's accelerator becomes the current device first, so a backend whose default
    device has no index ("cuda") lands on it; one that names device 0 itself ("npu:0")
    is built again on LOCAL_RANK's device. A CPU backend stays on the CPU (gloo).

    Args:
        requested: backend name or "auto".
        device: the user's device, or None.
        plan: this rank's plan.
        select: the selection function, select(requested, device) -> (backend, decision).
    Returns:
        What `select` returns.
    """
    def index() -> int:  # a launcher that shows each process one device leaves device_count() at 1
        return plan.local_rank % max(torch.accelerator.device_count(), 1)

    if torch.accelerator.is_available():
        torch.accelerator.set_device_index(index())
    chosen, decision = select(requested, None if device is None else distributed.rank_device(device, index()))
    own = chosen.device
    if device is None and own.type != "cpu" and own.index not in (None, index()):
        chosen, decision = select(requested, f"{own.type}:{index()}")
    return chosen, decision


# ---- loading this rank's slices -------------------------------------------------------------

class ShardedLoader(WeightLoader):
    """A WeightLoader that reads only this rank's slice of each tensor and only its routed experts.

    The whole checkpoint is still checked against the layout (headers only), so a
    wrong checkpoint is named before any data is read.

    Args:
        source: CheckpointSource or RandomSource (both read slices with get_slice).
        config: the whole model's config.
        plan: this rank's plan (checked with plan.check first).
        progress: show a progress bar.
        device: the rank's device, where each slice is moved and checked for NaN/Inf.
    """

    def __init__(self, source, config: ModelConfig, plan: ParallelPlan, progress: bool = True,
                 device: str | torch.device | None = None):
        super().__init__(source, config, include_mtp=False, progress=progress, device=device)
        self.plan = plan
        self._bar.total = sum(plan.holds(m, config.n_routed_experts) for m in self.specs)

    def tensor(self, module: str) -> torch.Tensor:
        cut = self.plan.cut(module)
        if cut is None:
            return super().tensor(module)
        self._bar.update(1)
        name = tensor_specs.tensor_name(module)
        start, stop = cut.bounds(self.source.meta(name)[0][cut.dim])
        return self.source.get_slice(name, cut.dim, start, stop)

    def linear(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's (weight, scale) slice; a cut inside an FP8 block comes back dequantized (fp32, no scale)."""
        cut = self.plan.cut(module)
        if cut is None:
            return super().linear(module)
        self._bar.update(1)
        name, scale_name = f"{module}.weight", f"{module}.weight_scale_inv"
        shape, dtype = self.source.meta(name)
        size = shape[cut.dim]
        start, stop = cut.bounds(size)
        if dtype != torch.float8_e4m3fn:
            return self.source.get_slice(name, cut.dim, start, stop), None
        block = fp8.BLOCK
        first, end = start // block * block, min(-(-stop // block) * block, size)
        weight = self.source.get_slice(name, cut.dim, first, end)
        scale = self.source.get_slice(scale_name, cut.dim, first // block, fp8.num_blocks(end))
        if (first, end) == (start, stop):
            return weight, scale
        dense = fp8.dequantize_blocks(weight, scale, torch.float32)
        return dense.narrow(cut.dim, start - first, stop - start).contiguous(), None

    def experts(self, module: str, num_experts: int, ids: range | None = None):
        """This rank's routed experts of one layer, stacked (each sliced when experts are split)."""
        return super().experts(module, num_experts, self.plan.local_experts(num_experts) if ids is None else ids)


# ---- the layers that combine across ranks -------------------------------------------------

class RowParallel:
    """A linear whose input features are split over a group: local partial sum, then all-reduce."""

    def __init__(self, linear, group):
        self.linear, self.group = linear, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(self.linear(x), self.group)


class StepRows:
    """Rows every DP group sends through the MoE exchange this step: the largest group's token count,
    rounded up to a multiple of tp (set by ParallelTransformer.hidden from ForwardBatch.dp_num_tokens)."""

    rows: int = 0


#: the newer names of all_gather_into_tensor and reduce_scatter_tensor (torch 2.13 warns on the old ones)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ParallelMoE:
    """A MoE layer spread over every rank (see the module docstring), with no host sync and static shapes.

    Every rank routes all the tokens it sees with the replicated gate and runs its own experts over every
    row: a (token, expert) pair routed to another rank's expert is marked -1, which the backend's grouped
    MoE op skips (no GEMM rows), so the op sees the one-process [N, k] shapes, runs only this rank's pairs,
    and nothing is counted or compacted on the host. The shared experts' partial sum is added by one TP
    group (by every DP group for its rows).

    Without DP attention every rank already holds every token: one all-reduce over the world sums the
    routed and shared contributions. With DP attention each DP group pads its tokens to StepRows.rows;
    every rank all-gathers its tp-th share of its group's rows over the world (dispatch: every rank now
    holds every group's rows), runs its experts on them, and a reduce-scatter over the world hands each
    rank its share of its group's summed rows, which an all-gather in the TP group completes (combine).
    """

    def __init__(self, moe: MoE, plan: ParallelPlan, num_experts: int, tp_group, step: StepRows):
        self.backend, self.routing = moe.backend, moe.routing
        self.gate_weight, self.bias, self.experts = moe.gate_weight, moe.bias, moe.experts
        self.shared = moe.shared if plan.dp > 1 or plan.replica == 0 else None
        self.first_expert = plan.local_experts(num_experts).start
        self.plan, self.tp_group, self.step = plan, tp_group, step

    def routed(self, x: torch.Tensor | QuantizedActivation, values: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weighted sum for every row of `values` [N, D] (x: the same rows, maybe FP8 too)."""
        weights, ids = self.backend.moe_route(values, self.gate_weight, self.bias, self.routing)
        local = ids - self.first_expert
        mine = (local >= 0) & (local < self.experts.num_experts)
        return self.backend.moe_experts(x, weights, torch.where(mine, local, -1), self.experts)

    def __call__(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        flat = plain(x).reshape(-1, x.shape[-1])
        inp = QuantizedActivation(flat, x.q, x.scales) if isinstance(x, QuantizedActivation) else flat
        if self.plan.dp == 1:
            out = self.routed(inp, flat)
            if self.shared is not None:
                out = out + self.shared(inp)
            return distributed.all_reduce(out).view(x.shape)
        return self._data_parallel(inp, flat).view(x.shape)

    def _data_parallel(self, inp, flat: torch.Tensor) -> torch.Tensor:
        plan, rows, n = self.plan, self.step.rows, flat.shape[0]
        share = rows // plan.tp
        mine = F.pad(flat, (0, 0, 0, rows - n))
        everyone = flat.new_empty(plan.dp * rows, flat.shape[1])
        _all_gather(everyone, mine[plan.tp_rank * share:(plan.tp_rank + 1) * share].contiguous())
        partial = self.routed(everyone, everyone)
        if self.shared is not None and n:
            first = plan.dp_rank * rows
            partial[first:first + n] += self.shared(inp)
        summed = flat.new_empty(share, flat.shape[1])
        _reduce_scatter(summed, partial)
        if plan.tp == 1:
            return summed[:n]
        group_rows = flat.new_empty(rows, flat.shape[1])
        _all_gather(group_rows, summed, group=self.tp_group)
        return group_rows[:n]


class ParallelTransformer(Transformer):
    """The Transformer built from this rank's slices, with its cross-rank combines.

    Args:
        config: the whole model's config (self.config stays this one).
        backend: this rank's backend.
        loader: a ShardedLoader (its plan says which slices this rank holds).
        precision, max_model_len: as for Transformer. The latent cache is shared by all heads, so every
            rank of a TP group keeps its group's whole cache (the same blocks: see agree_min); under DP
            attention each DP group's cache holds only its own requests.
    """

    def __init__(self, config: ModelConfig, backend: Backend, loader: ShardedLoader, precision: str,
                 max_model_len: int):
        plan = loader.plan
        super().__init__(plan.local_config(config), backend, loader, precision, max_model_len)
        self.config, self.plan = config, plan
        self.tp_group = tp_group(plan)
        self.step_rows = StepRows()
        self.vocab_start = plan.tp_rank * (config.vocab_size // plan.tp)
        for layer in self.layers:
            if plan.tp > 1:
                layer.attn.o_proj = RowParallel(layer.attn.o_proj, self.tp_group)
            if isinstance(layer.ffn, MoE):
                layer.ffn = ParallelMoE(layer.ffn, plan, config.n_routed_experts, self.tp_group, self.step_rows)
            elif plan.tp > 1:
                layer.ffn.down_proj = RowParallel(layer.ffn.down_proj, self.tp_group)

    def supports_graphs(self) -> bool:
        """A step has no host sync and static shapes (see ParallelMoE): it records where the backend does."""
        return True

    def runs_in_lockstep(self) -> bool:
        return True

    def hidden(self, batch: ForwardBatch, caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """As Transformer.hidden; under DP attention a group with no tokens skips attention and joins each
        MoE layer's exchange with no rows of its own."""
        if self.plan.dp == 1:
            return super().hidden(batch, caches)
        counts = batch.dp_num_tokens
        if counts is None:  # an eager call outside the engine (logits, tests): ask the other groups
            counts = tuple(distributed.all_gather_objects(batch.num_tokens)[::self.plan.tp])
        if len(counts) != self.plan.dp or counts[self.plan.dp_rank] != batch.num_tokens:
            raise Dsv3Error(f"dp_num_tokens {counts} does not fit this step: {self.plan.dp} DP groups, and DP "
                            f"group {self.plan.dp_rank} has {batch.num_tokens} tokens")
        tp = self.plan.tp
        self.step_rows.rows = -(-max(counts) // tp) * tp
        if batch.num_tokens:
            return super().hidden(batch, caches)
        empty = torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.backend.device)
        if self.step_rows.rows:
            for layer in self.layers:
                if isinstance(layer.ffn, ParallelMoE):
                    layer.ffn(empty)
        return empty

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each rank looks up the tokens in its vocabulary rows (zeros elsewhere); the all-reduce fills in."""
        if self.plan.tp == 1:
            return super().embed_tokens(tokens)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.embed.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.embed).masked_fill(outside[..., None], 0)
        return distributed.all_reduce(x, self.tp_group)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each rank's vocabulary slice of the logits, all-gathered: the same float32 logits on every rank
        (of the TP group)."""
        if hidden.shape[0] == 0:  # an idle DP group: every rank of the group is idle
            return torch.empty(0, self.config.vocab_size, dtype=torch.float32, device=hidden.device)
        logits = super().project(hidden)
        return logits if self.plan.tp == 1 else distributed.all_gather_last(logits, self.tp_group)


def tp_group(plan: ParallelPlan):
    """The process group of this rank's TP ranks (every rank must call this, in the same order)."""
    if plan.tp in (1, plan.world_size):
        return None
    mine = None
    for replica in range(plan.world_size // plan.tp):
        group = dist.new_group(list(range(replica * plan.tp, (replica + 1) * plan.tp)))
        if replica == plan.replica:
            mine = group
    return mine


# ---- building ------------------------------------------------------------------------------

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint(config: ModelConfig, source, settings: dict) -> dict:
    """What every rank must agree on: the config, the checkpoint's contents and the settings."""
    if isinstance(source, CheckpointSource):
        where = str(source.path)
        sizes = {shard: shard.stat().st_size for shard in set(source.files.values())}
        weights = _digest(sorted((name, shard.name, sizes[shard]) for name, shard in source.files.items()))
    else:
        where, weights = "synthetic", _digest([getattr(source, "seed", None), getattr(source, "fp8", None)])
    return {"checkpoint": where, "config": _digest(config.to_dict()), "weights": weights, **settings}


def agree(mine: dict) -> None:
    """Raise Dsv3Error on every rank where any rank's fingerprint differs from rank 0's."""
    everyone = distributed.all_gather_objects(mine)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        for key in first:
            if key != "checkpoint" and theirs.get(key) != first[key]:
                raise Dsv3Error(f"ranks disagree on the {key}: rank 0 has {first[key]!r} ({first['checkpoint']}), "
                                f"rank {rank} has {theirs.get(key)!r} ({theirs['checkpoint']}); every rank must "
                                "load the same checkpoint with the same options")


def build(plan: ParallelPlan, config: ModelConfig, backend: Backend, source, precision: str,
          max_model_len: int, load_mtp: bool = False, progress: bool = True) -> ParallelTransformer:
    """Join the process group, check the cut on every rank, then load this rank's part of the model.

    Every check (ranks agreeing, heads/experts/vocabulary dividing, FP8 block
    boundaries, every rank's weights fitting its device, the checkpoint's layout)
    runs before any weight is read.
    """
    distributed.init(backend.capabilities.dist_backend, backend.device)
    if dist.get_world_size() != plan.world_size:
        raise Dsv3Error(f"the process group has {dist.get_world_size()} ranks, the plan {plan.world_size}")
    settings = {"precision": precision, "tp": plan.tp, "ep": plan.ep, "dp": plan.dp,
                "backend": backend.capabilities.name, "max_model_len": max_model_len, "load_mtp": load_mtp}
    agree(fingerprint(config, source, settings))
    plan.check(config, precision, load_mtp)
    check_memory(plan, config, precision, backend)
    loader = ShardedLoader(source, config, plan, progress=progress and plan.is_primary, device=backend.device)
    try:
        return ParallelTransformer(config, backend, loader, precision, max_model_len)
    finally:
        loader.close()


def check_memory(plan: ParallelPlan, config: ModelConfig, precision: str, backend: Backend) -> None:
    """Raise Dsv3Error on every rank where any rank's device has less free memory than a rank's weights.

    Every rank holds as much (the cuts are even); the ranks share their free memory first, so all of them
    stop together instead of some loading and then waiting for the others forever.
    """
    weights, _ = checks.model_bytes(config, precision, 0, 0, plan)
    memory = backend.memory_info()
    mine = (memory.free, memory.total, str(backend.device)) if memory.accelerator else None
    short = [(rank, m) for rank, m in enumerate(distributed.all_gather_objects(mine)) if m and m[0] < weights]
    if short:
        rank, (free, total, device) = min(short, key=lambda item: item[1][0])
        raise Dsv3Error(f"this layout puts {_size(weights)} of {precision} weights on each rank, but rank "
                        f"{rank}'s {device} has {_size(free)} free of {_size(total)}"
                        f"{f' ({len(short)} ranks are short)' if len(short) > 1 else ''}; use more ranks or "
                        "devices with more memory (dsv3 doctor --plan shows what fits)")


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def agree_min(num_blocks: int) -> int:
    """The cache size every rank uses: the smallest any rank can hold (their schedules must match)."""
    return min(distributed.all_gather_objects(num_blocks))
