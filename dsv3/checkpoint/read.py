"""Reading weights: a sharded safetensors checkpoint or synthetic weights, one tensor at a time.

Every tensor the model will ask for is checked against the layout from the
safetensors headers before any data is read: a missing, unexpected,
misshaped or wrongly typed tensor is one error naming it.
"""

from __future__ import annotations

import json
import math
import stat
import sys
import zlib
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from dsv3 import tensor_specs
from dsv3.backends import fp8
from dsv3.config import ModelConfig
from dsv3.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def check_regular_file(path: Path) -> None:
    """Refuse a FIFO, device or directory before opening it: reading one would block or fail obscurely."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise CheckpointError(f"{path}: is {kind}; checkpoint files must be regular files")


#: a shard whose last this-many bytes are all zero is taken for a download cut short and padded with zeros
ZERO_TAIL_BYTES = 1 << 20


def check_tail(shard: Path) -> None:
    """Refuse a shard whose data ends in ZERO_TAIL_BYTES of zero bytes: no trained weights are exactly zero
    over a megabyte, but a download cut short into a preallocated (sparse) file is. Its tensors would
    load, pass the NaN/Inf check and compute nonsense."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
            if size - data_start < ZERO_TAIL_BYTES:
                return
            f.seek(size - ZERO_TAIL_BYTES)
            tail = f.read(ZERO_TAIL_BYTES)
    except OSError as e:
        raise CheckpointError(f"{shard}: unreadable ({e.strerror or e})") from None
    if tail == bytes(len(tail)):
        raise CheckpointError(f"{shard}: its last {ZERO_TAIL_BYTES >> 20} MiB are all zero bytes, as a download "
                              f"cut short leaves a preallocated file; download it again")


def read_json(path: Path, what: str = "JSON file") -> object:
    """A small JSON file, refused with one line when it is not a regular file, not UTF-8 or not JSON."""
    check_regular_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None


def _read_weight_map(directory: Path, index: Path) -> dict[str, str]:
    """The index's weight_map, every shard name a plain file name inside the checkpoint directory."""
    raw = read_json(index, "safetensors index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = (("an empty one" if weight_map == {} else type(weight_map).__name__)
                 if isinstance(raw, dict) and "weight_map" in raw else "none")
        raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" object of tensor name -> shard file, "
                              f"found {found}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{name!r}] must be a shard file name, found {shard!r}")
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index}: shard {shard!r} (for {name}) is outside the checkpoint directory; "
                                  f"shard names must be files in {directory}")
    return weight_map


class WeightSource(Protocol):
    """Where WeightLoader reads tensors by their checkpoint names: CheckpointSource (a safetensors
    checkpoint on disk) or RandomSource (synthetic weights); FiniteSource wraps either. A source may also
    offer `stacked_experts(module, ids)` (RandomSource does), which the loader then uses."""

    def names(self) -> set[str]:
        """Every tensor name the source holds."""

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor without reading its data."""

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor."""

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the tensor along `dim` (a tensor-parallel shard)."""


class CheckpointSource:
    """Tensors of a Hugging Face safetensors checkpoint, read lazily by name.

    Args:
        path: the checkpoint directory (config.json, model.safetensors.index.json or
            model.safetensors, *.safetensors shards).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        index = self.path / INDEX_FILE
        if index.exists():
            self.files = {name: self.path / shard for name, shard in _read_weight_map(self.path, index).items()}
            for shard in sorted(set(self.files.values())):
                if not shard.exists():
                    raise CheckpointError(f"{index}: names shard {shard.name}, which does not exist")
                check_regular_file(shard)
                check_tail(shard)
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path}: no {INDEX_FILE} and no *.safetensors files")
            self.files = {}
            for shard in shards:
                check_regular_file(shard)
                check_tail(shard)
                for name in self._open(shard).keys():
                    if name in self.files:
                        raise CheckpointError(f"{self.path}: tensor {name} is in two shards, {self.files[name].name} "
                                              f"and {shard.name} (remove the stray file, or add {INDEX_FILE})")
                    self.files[name] = shard

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{shard}: unreadable safetensors file ({e})") from None
        return self._handles[shard]

    def names(self) -> set[str]:
        return set(self.files)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the file header, without reading the data."""
        shard = self.files[name]
        try:
            s = self._open(shard).get_slice(name)
            shape, dtype = tuple(s.get_shape()), _DTYPES.get(s.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: tensor {name}: {e}") from None
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {name} has unsupported dtype {s.get_dtype()}")
        return shape, (torch.float8_e4m3fn if dtype == torch.float8_e4m3fnuz else dtype)

    def _is_fnuz(self, name: str) -> bool:
        shard = self.files.get(name)
        try:
            return shard is not None and self._open(shard).get_slice(name).get_dtype() == "F8_E4M3FNUZ"
        except SafetensorError:
            return False

    def _as_fn(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """e4m3fnuz files (`dsv3 convert --to e4m3fnuz`) read as the e4m3fn checkpoint they came from."""
        if tensor.dtype == torch.float8_e4m3fnuz:
            return fp8.fnuz_to_fn(tensor, torch.ones(()))[0]
        if name.endswith(".weight_scale_inv") and self._is_fnuz(name.removesuffix("_scale_inv")):
            return tensor * 0.5
        return tensor

    def get(self, name: str) -> torch.Tensor:
        shard = self.files[name]
        try:
            return self._as_fn(name, self._open(shard).get_tensor(name))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{shard}: cannot read tensor {name} (truncated or corrupt file?): {e}") from None

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor; only those bytes are read."""
        shard = self.files[name]
        try:
            part = self._open(shard).get_slice(name)
            return self._as_fn(name, (part[start:stop] if dim == 0 else part[:, start:stop]).contiguous())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{shard}: cannot read tensor {name} (truncated or corrupt file?): {e}") from None


_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "BF16": torch.bfloat16,
           "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2}


#: standard deviation of RandomSource(fast=True)'s FP8 expert values (7 of them fit under e4m3fn's 448)
FAST_FP8_STD = 64.0


class RandomSource:
    """Synthetic weights in the checkpoint layout, deterministic per tensor name.

    Linear weights are N(0, 1/sqrt(in)) and, with fp8=True, block-quantized to
    e4m3fn with scales as in the real checkpoint; norms are 1.

    Args:
        config: the model config.
        fp8: store linears as FP8 + weight_scale_inv.
        seed: base seed; each tensor's generator is seeded from it and the name.
        device: where tensors are made (a GPU makes large models quickly).
        fast: with fp8, make each layer's routed experts already stacked (`stacked_experts`):
            FP8 values cast straight from N(0, FAST_FP8_STD) and one scale for all blocks, so that
            the weights are still N(0, 1/sqrt(in)); no per-expert tensors to stack (which would
            hold a layer twice) and no block quantization. For single-process loading (a
            ShardedLoader that splits experts would get them whole).
    """

    def __init__(self, config: ModelConfig, fp8: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                 fast: bool = False):
        self.config, self.fp8, self.seed, self.device = config, fp8, seed, torch.device(device)
        self.fast = fast
        self.specs = tensor_specs.module_specs(config)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for module, spec in self.specs.items():
            name = tensor_specs.tensor_name(module)
            if spec.kind == tensor_specs.LINEAR and fp8:
                self._meta[name] = (spec.shape, torch.float8_e4m3fn)
                rows, cols = (math.ceil(n / fp8_block) for n, fp8_block in zip(spec.shape, (128, 128), strict=True))
                self._meta[f"{module}.weight_scale_inv"] = ((rows, cols), torch.float32)
            else:
                self._meta[name] = (spec.shape, torch.float32 if spec.kind == tensor_specs.FP32 else torch.bfloat16)

    def names(self) -> set[str]:
        return set(self._meta)

    def meta(self, name: str):
        return self._meta[name]

    def _generator(self, name: str) -> torch.Generator:
        g = torch.Generator(self.device)
        g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return g

    def get(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight_scale_inv").removesuffix(".weight")
        spec = self.specs.get(module) or self.specs[name]
        g = self._generator(module)
        if spec.kind == tensor_specs.FP32:
            return torch.randn(spec.shape, generator=g, device=self.device) * 1e-3
        if module.endswith("norm"):
            return torch.ones(spec.shape, dtype=torch.bfloat16, device=self.device)
        w = torch.randn(spec.shape, generator=g, device=self.device) * spec.shape[-1] ** -0.5
        if spec.kind == tensor_specs.LINEAR and self.fp8:
            q, s = fp8.quantize_blocks(w)
            return s if name.endswith("weight_scale_inv") else q
        return w.to(torch.bfloat16)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor (made whole, then cut)."""
        return self.get(name).narrow(dim, start, stop - start).clone()

    def stacked_experts(self, module: str, ids: range) -> tuple[torch.Tensor, ...] | None:
        """With fast and fp8: the routed experts `ids` of MoE `module`, stacked as WeightLoader.experts
        returns them (gate_up [E, 2I, D], its scales, down [E, D, I], its scales); else None."""
        if not (self.fast and self.fp8):
            return None
        hidden, inter = self.config.hidden_size, self.config.moe_intermediate_size
        largest = fp8.fp8_max(torch.float8_e4m3fn)
        parts = []
        for rows, cols, name in ((2 * inter, hidden, "gate_up"), (hidden, inter, "down")):
            weight = torch.empty(len(ids), rows, cols, dtype=torch.float8_e4m3fn, device=self.device)
            for index, expert in enumerate(ids):
                g = self._generator(f"{module}.experts.{expert}.{name}")
                values = torch.randn(rows, cols, generator=g, device=self.device).mul_(FAST_FP8_STD)
                weight[index] = values.clamp_(-largest, largest)
            scale = torch.full((len(ids), math.ceil(rows / fp8.BLOCK), math.ceil(cols / fp8.BLOCK)),
                               1.0 / (FAST_FP8_STD * cols ** 0.5), device=self.device)
            parts += [weight, scale]
        return tuple(parts)


class FiniteSource:
    """A source whose tensors come moved to `device` and checked for NaN/Inf there, named when they have any.

    A NaN weight makes every later activation NaN, and the model would answer nothing with no error.
    The check reads each tensor once where it lands (an accelerator does it at memory speed) and
    syncs once per tensor, which the host-to-device copy does anyway.

    Args:
        source: a CheckpointSource or RandomSource (anything with names/meta/get/get_slice).
        device: where tensors go; None leaves them where the source makes them.
    """

    def __init__(self, source: WeightSource, device: str | torch.device | None = None):
        self.source = source
        self.device = None if device is None else torch.device(device)
        self.bytes_loaded = 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def get(self, name: str) -> torch.Tensor:
        return self._checked(name, self.source.get(name))

    def stacked_experts(self, module: str, ids: range) -> tuple[torch.Tensor, ...] | None:
        """The source's stacked experts where it makes them (synthetic: finite by construction), counted."""
        make = getattr(self.source, "stacked_experts", None)
        stacked = None if make is None else make(module, ids)
        if stacked is not None:
            self.bytes_loaded += sum(t.numel() * t.element_size() for t in stacked)
        return stacked

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._checked(name, self.source.get_slice(name, dim, start, stop))

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.device is not None:
            tensor = tensor.to(self.device)
        self.bytes_loaded += tensor.numel() * tensor.element_size()
        if tensor.dtype == torch.float8_e4m3fn:  # no Inf; NaN is every bit of exponent and mantissa set
            bad = (tensor.view(torch.uint8) & 0x7F).eq(0x7F).any()
        elif tensor.dtype == torch.float8_e4m3fnuz:  # NaN is the negative zero pattern
            bad = tensor.view(torch.uint8).eq(0x80).any()
        elif tensor.dtype.is_floating_point:
            bad = ~torch.isfinite(tensor).all()
        else:
            return tensor
        if bool(bad):
            where = getattr(self.source, "path", "synthetic weights")
            shard = getattr(self.source, "files", {}).get(name)
            raise CheckpointError(f"{shard or where}: tensor {name} has NaN or Inf values")
        return tensor


def check_config_fits(config, source: "CheckpointSource") -> None:
    """Refuse a config.json whose sizes the shards cannot hold, before any per-layer work: a layer or
    expert count of 10**9 passes every field check and would otherwise build per-layer layouts for minutes
    and fill memory. The bound: weights the config needs at the least (each at least one byte, so at most
    the shards' total size), each term named by the fields that make it."""
    c = config
    hidden, heads = c.hidden_size, c.num_attention_heads
    q = c.q_lora_rank * (hidden + heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)) if c.q_lora_rank else \
        hidden * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    attention = q + (c.kv_lora_rank + c.qk_rope_head_dim) * hidden + c.kv_lora_rank * heads * (
        c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * hidden + 2 * hidden
    num_dense = min(c.first_k_dense_replace, c.num_hidden_layers) if c.n_routed_experts else c.num_hidden_layers
    num_moe = (c.num_hidden_layers - num_dense) // max(c.moe_layer_freq, 1) if c.n_routed_experts else 0
    experts = (c.n_routed_experts or 0) + (c.n_shared_experts or 0)
    terms = {
        "vocab_size x hidden_size": c.vocab_size * hidden,
        "num_hidden_layers and the attention sizes": c.num_hidden_layers * attention,
        "the dense layers' intermediate_size": num_dense * 3 * c.intermediate_size * hidden,
        "n_routed_experts and n_shared_experts x moe_intermediate_size": num_moe * experts * 3 * c.moe_intermediate_size
        * hidden,
    }
    shards = sorted(set(source.files.values()))
    for shard in shards:  # a truncated or unreadable shard is named as such first
        source._open(shard)
    capacity = sum(shard.stat().st_size for shard in shards)
    if sum(terms.values()) > capacity:
        field, needed = max(terms.items(), key=lambda item: item[1])
        raise CheckpointError(f"{source.path / 'config.json'}: {field} need at least {needed:.3g} weights, but the "
                              f"{len(shards)} shards hold at most {capacity:.3g} ({capacity} bytes): config.json "
                              f"does not describe these weights (num_hidden_layers={c.num_hidden_layers}, "
                              f"n_routed_experts={c.n_routed_experts}, hidden_size={hidden})")


class WeightLoader:
    """Hands the model its tensors, checked against the layout, with a progress bar.

    Args:
        source: a WeightSource (CheckpointSource or RandomSource).
        config: the model config the checkpoint must match.
        include_mtp: load the MTP module too (else its tensors are ignored).
        progress: show a progress bar on stderr.
        device: where the model will hold its weights; each tensor is moved there and checked for
            NaN/Inf there (cheap on an accelerator). None: checked where the source makes it.
    """

    def __init__(self, source: WeightSource, config: ModelConfig, include_mtp: bool = False, progress: bool = True,
                 device: str | torch.device | None = None):
        self.source, self.config = FiniteSource(source, device), config
        self.specs = tensor_specs.module_specs(config, include_mtp=True)
        skipped = () if include_mtp else tensor_specs.mtp_prefixes(config)
        self.specs = {m: s for m, s in self.specs.items() if not (skipped and m.startswith(skipped))}
        self._where = getattr(source, "path", "synthetic weights")
        self._check(skipped)
        self._bar = tqdm(total=len(self.specs), desc="loading weights", unit="tensor", file=sys.stderr,
                         disable=not progress, leave=False)

    def _check(self, skipped: tuple[str, ...]) -> None:
        names = self.source.names()
        expected = set()
        for module, spec in self.specs.items():
            name = tensor_specs.tensor_name(module)
            expected.add(name)
            if name not in names:
                raise CheckpointError(f"{self._where}: missing tensor {name} (expected shape {list(spec.shape)})")
            shape, dtype = self.source.meta(name)
            if shape != spec.shape:
                raise CheckpointError(f"{self._where}: tensor {name} has shape {list(shape)}, "
                                      f"expected {list(spec.shape)}")
            scale = f"{module}.weight_scale_inv"
            if dtype == torch.float8_e4m3fn and spec.kind == tensor_specs.LINEAR:
                if scale not in names:
                    raise CheckpointError(f"{self._where}: FP8 tensor {name} has no {scale}")
                want = tuple(math.ceil(n / fp8.BLOCK) for n in spec.shape)
                s_shape, s_dtype = self.source.meta(scale)
                if s_shape != want or s_dtype != torch.float32:
                    raise CheckpointError(f"{self._where}: tensor {scale} is {str(s_dtype)[6:]} {list(s_shape)}, "
                                          f"expected float32 {list(want)}")
                expected.add(scale)
            elif not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                fp8_too = "float8_e4m3fn or " if spec.kind == tensor_specs.LINEAR else ""
                raise CheckpointError(f"{self._where}: tensor {name} has dtype {str(dtype)[6:]}, expected "
                                      f"{fp8_too}bf16/fp16/fp32")
            elif spec.kind == tensor_specs.FP32 and dtype != torch.float32:
                raise CheckpointError(f"{self._where}: tensor {name} has dtype {str(dtype)[6:]}, expected float32")
        unexpected = sorted(n for n in names - expected if not (skipped and n.startswith(skipped)))
        if unexpected:
            raise CheckpointError(f"{self._where}: unexpected tensor {unexpected[0]} "
                                  f"({len(unexpected)} unexpected in all; does config.json match the weights?)")

    def tensor(self, module: str) -> torch.Tensor:
        """A non-quantized tensor (norm, embedding, router) by module name."""
        self._bar.update(1)
        return self.source.get(tensor_specs.tensor_name(module))

    def linear(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, weight_scale_inv or None) of a linear by module name."""
        self._bar.update(1)
        weight = self.source.get(f"{module}.weight")
        scale = self.source.get(f"{module}.weight_scale_inv") if weight.dtype == torch.float8_e4m3fn else None
        return weight, scale

    def experts(self, module: str, num_experts: int, ids: range | None = None) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Stacked routed experts of one layer: (gate_up [E, 2I, D], its scales, down [E, D, I], its scales).

        Args:
            module: the MoE module name ("model.layers.3.mlp").
            num_experts: routed experts in the layer.
            ids: the experts to stack (default all); E is then len(ids).

        Raises CheckpointError where experts mix FP8 and dense weights, or where an FP8
        intermediate size is not a multiple of 128 (gate and up blocks could not be stacked).
        """
        ids = range(num_experts) if ids is None else ids
        stacked = getattr(self.source, "stacked_experts", None)
        stacked = stacked(module, ids) if stacked is not None else None
        if stacked is not None:  # a source that makes them stacked (RandomSource(fast=True))
            self._bar.update(3 * len(ids))
            return stacked
        gate_up, gate_up_scale, down, down_scale = [], [], [], []
        for e in ids:
            p = f"{module}.experts.{e}"
            (g, gs), (u, us), (d, ds) = (self.linear(f"{p}.{part}_proj") for part in ("gate", "up", "down"))
            if len({g.dtype, u.dtype, d.dtype}) != 1:
                raise CheckpointError(f"{self._where}: expert {p} mixes dtypes {g.dtype}, {u.dtype}, {d.dtype}")
            if gs is not None and g.shape[0] % fp8.BLOCK:
                raise CheckpointError(f"{self._where}: {p}.gate_proj has {g.shape[0]} rows; FP8 experts need a "
                                      f"moe_intermediate_size that is a multiple of {fp8.BLOCK}")
            gate_up.append(torch.cat((g, u)))
            down.append(d)
            if gs is not None:
                gate_up_scale.append(torch.cat((gs, us)))
                down_scale.append(ds)
        stack = lambda ts: torch.stack(ts) if ts else None  # noqa: E731
        if gate_up_scale and len(gate_up_scale) != len(ids):
            raise CheckpointError(f"{self._where}: {module}.experts mix FP8 and dense weights")
        return stack(gate_up), stack(gate_up_scale), stack(down), stack(down_scale)

    @property
    def bytes_loaded(self) -> int:
        """Bytes of tensors handed out so far."""
        return self.source.bytes_loaded

    def close(self) -> None:
        self._bar.close()
