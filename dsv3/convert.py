"""Converting an FP8 checkpoint: to BF16, or to e4m3fnuz for MI300X (gfx942).

Tensors are read, converted and written one at a time, source shard after
source shard, so memory holds about one output shard. Output goes to a
temporary directory that is renamed into place only when complete.

- bf16: every FP8 weight is multiplied by its 128x128 block scales and stored
  in BF16; the weight_scale_inv tensors go; config.json loses quantization_config.
- e4m3fnuz: the FP8 bits are reinterpreted as e4m3fnuz, 0x80 (NaN in fnuz) becomes
  0 and every scale doubles (dsv3.backends.fp8.fn_to_fnuz); config.json records fmt e4m3fnuz.
Other files beside the weights (tokenizer, generation config, code, license) are copied.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.backends import fp8
from dsv3.checkpoint import (
    INDEX_FILE,
    CheckpointSource,
    FiniteSource,
    ShardWriter,
    atomic_directory,
    check_output,
    is_checkpoint_dir,
    read_json,
    write_config,
)
from dsv3.config import from_dict
from dsv3.errors import CheckpointError, Dsv3Error

TARGETS = ("bf16", "e4m3fnuz")
SCALE_SUFFIX = "_scale_inv"


def convert_checkpoint(source: str | Path, target: str | Path, to: str = "bf16", overwrite: bool = False,
                       max_shard_bytes: int = 5 << 30, progress: bool = True) -> Path:
    """Convert the FP8 checkpoint in `source` and write it to `target`.

    Args:
        source: a Hugging Face DeepSeek checkpoint directory with FP8 (e4m3fn) weights.
        target: the output directory (must not exist unless overwrite).
        to: "bf16" or "e4m3fnuz".
        overwrite: replace an existing target once the new one is complete.
        max_shard_bytes: size of the output shards.
        progress: show a progress bar on stderr.
    Returns:
        The target path.
    Raises:
        Dsv3Error: bad arguments, a checkpoint that is not FP8, a missing scale, too little disk space.
    """
    source, target = Path(source), Path(target)
    if to not in TARGETS:
        raise Dsv3Error(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if not _is_int(max_shard_bytes) or max_shard_bytes <= 0:
        raise Dsv3Error(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if not (source / "config.json").is_file():
        raise Dsv3Error(f"{source}: not a checkpoint directory (no config.json)")
    check_target(source, target, overwrite)
    links = _check_links(source)
    raw_config = _read_config(source)
    reader = FiniteSource(CheckpointSource(source))  # a NaN/Inf weight is named, not converted
    scales = _fp8_weights(reader)
    if not scales:
        raise CheckpointError(f"{source}: no float8_e4m3fn weights with {SCALE_SUFFIX} scales; nothing to convert")
    _check_disk_space(reader, target, to)

    names = _in_shard_order(reader)
    scale_names = set(scales.values())
    total = len(names) - (len(scale_names) if to == "bf16" else 0)
    bar = tqdm(total=total, desc=f"converting to {to}", unit="tensor", file=sys.stderr, disable=not progress,
               leave=False)
    try:
        with atomic_directory(target, overwrite) as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            for name in names:
                if name in scale_names:
                    continue  # written with its weight
                tensor = reader.get(name)
                if name in scales:
                    for out_name, out in _convert(name, tensor, reader.get(scales[name]), scales[name], to):
                        writer.add(out_name, out)
                        bar.update(1)
                else:
                    writer.add(name, tensor)
                    bar.update(1)
            writer.finish()
            write_config(tmp, _converted_config(raw_config, to))
            _copy_other_files(source, tmp, links)
    finally:
        bar.close()
    return target


def _convert(name: str, weight: torch.Tensor, scale: torch.Tensor, scale_name: str, to: str):
    """(name, tensor) pairs to write for one FP8 weight and its scales."""
    if to == "bf16":
        return [(name, fp8.dequantize_blocks(weight, scale, torch.bfloat16))]
    fnuz, doubled = fp8.fn_to_fnuz(weight, scale.float())
    return [(name, fnuz), (scale_name, doubled)]


def _read_config(source: Path) -> dict:
    path = source / "config.json"
    raw = read_json(path, "config.json")
    from_dict(raw, source=str(path))  # every field checked before any tensor is read
    return raw


def _fp8_weights(reader: CheckpointSource) -> dict[str, str]:
    """FP8 weight name -> its scale's name; an FP8 weight without a float32 scale is an error."""
    scales = {}
    names = reader.names()
    for name in sorted(names):
        if reader.meta(name)[1] != torch.float8_e4m3fn:
            continue
        scale = name + SCALE_SUFFIX
        if scale not in names:
            raise CheckpointError(f"{reader.path}: FP8 tensor {name} has no {scale}")
        shape, dtype = reader.meta(name)
        scale_shape, scale_dtype = reader.meta(scale)
        want = tuple(fp8.num_blocks(n) for n in shape[-2:])
        if len(shape) != 2 or tuple(scale_shape) != want or scale_dtype != torch.float32:
            raise CheckpointError(f"{reader.path}: tensor {scale} is {str(scale_dtype)[6:]} {list(scale_shape)}, "
                                  f"expected float32 {list(want)} for {name} {list(shape)}")
        scales[name] = scale
    return scales


def _in_shard_order(reader: CheckpointSource) -> list[str]:
    """Tensor names grouped by source shard (shards in name order), so each shard is read once, in turn."""
    return sorted(reader.names(), key=lambda n: (reader.files[n].name, n))


def _output_bytes(reader: CheckpointSource, to: str) -> int:
    total = 0
    for name in reader.names():
        shape, dtype = reader.meta(name)
        numel = 1
        for n in shape:
            numel *= n
        size = torch.empty((), dtype=dtype).element_size()
        total += numel * (2 if dtype == torch.float8_e4m3fn and to == "bf16" else size)
    return total


def _check_disk_space(reader: CheckpointSource, target: Path, to: str) -> None:
    needed = _output_bytes(reader, to)
    parent = target.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise Dsv3Error(f"{target}: the {to} checkpoint needs about {needed / 2**30:.1f} GiB, "
                        f"only {free / 2**30:.1f} GiB free on that disk")


def _converted_config(raw: dict, to: str) -> dict:
    config = dict(raw)
    if to == "bf16":
        config.pop("quantization_config", None)
        if "torch_dtype" in config:
            config["torch_dtype"] = "bfloat16"
    else:
        quantization = config.get("quantization_config") or {
            "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        config["quantization_config"] = {**quantization, "fmt": "e4m3fnuz"}
    return config


#: files beside the weights that a checkpoint needs; others (caches, notes, dotfiles) are not copied
OTHER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "added_tokens.json", "generation_config.json", "LICENSE", "LICENSE-CODE", "LICENSE-MODEL",
               "README.md")


def _copy_other_files(source: Path, directory: Path, links: dict[Path, Path]) -> None:
    """Copy the regular top-level files a checkpoint needs besides weights, index and config: tokenizer
    files, generation config, the model code (*.py) and licenses. Each keeps its permissions."""
    for path in sorted(source.iterdir()):
        if _is_other_file(path) and path.is_file():
            shutil.copyfile(links.get(path, path), directory / path.name)
            shutil.copymode(links.get(path, path), directory / path.name)


def check_target(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse an output that is the source, holds it or lies in it; that is a file; that exists without
    overwrite; or that overwrite would replace while it is not a checkpoint (nor empty). All before any work."""
    src, out = source.resolve(), target.resolve()
    if out == src:
        raise Dsv3Error(f"{target}: the output must differ from the source checkpoint")
    if out in src.parents:
        raise Dsv3Error(f"{target}: the output contains the source checkpoint {source}; "
                        f"replacing it would delete the source")
    if src in out.parents:
        raise Dsv3Error(f"{target}: the output lies inside the source checkpoint {source}; choose a directory "
                        f"outside it")
    check_output(target, overwrite)
    if target.is_dir() and any(target.iterdir()) and not is_checkpoint_dir(target):
        raise Dsv3Error(f"{target}: not empty and not a checkpoint (no config.json and *.safetensors); "
                        f"--overwrite replaces only a checkpoint directory")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if not _written_by_convert(p, source))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise Dsv3Error(f"{target}: holds {shown}, which a converted checkpoint does not; --overwrite "
                            f"replaces the whole directory, so it refuses one holding anything else (move those "
                            f"out, or choose another output)")


def _written_by_convert(path: Path, source: Path) -> bool:
    """A file of the kind convert writes: config, index, shards, or a file it copies from this source."""
    if path.is_symlink() or not path.is_file():
        return False
    return path.name in ("config.json", INDEX_FILE) or path.suffix == ".safetensors" or (
        _is_other_file(path) and (source / path.name).is_file())


def _check_links(source: Path) -> dict[Path, Path]:
    """Symbolic links among the files convert reads -> what they point to. A link that leaves the source
    is refused (a private file elsewhere would be copied), except the Hugging Face cache's links from
    snapshots/REVISION/ into the repository's blobs/."""
    root = source.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    links = {}
    for path in sorted(source.iterdir()):
        if not path.is_symlink() or not _read_by_convert(path):
            continue
        real = path.resolve()
        if not (root in real.parents or (blobs is not None and blobs in real.parents)):
            raise CheckpointError(f"{path}: a link to {real}, outside the source checkpoint; refusing to follow "
                                  f"it (copy the file into {source} if it belongs to the checkpoint)")
        links[path] = real
    return links


def _is_other_file(path: Path) -> bool:
    return path.name in OTHER_FILES or (path.suffix == ".py" and not path.name.startswith("."))


def _read_by_convert(path: Path) -> bool:
    return path.name in ("config.json", INDEX_FILE) or path.suffix == ".safetensors" or _is_other_file(path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
