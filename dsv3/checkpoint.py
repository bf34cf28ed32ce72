"""Writing checkpoints in the Hugging Face layout, all or nothing.

Output goes to a temporary directory beside the target and is renamed into
place only when every file is complete, so an interrupted write leaves no
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from dsv3.errors import Dsv3Error
from dsv3.weights import INDEX_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `target` only if the block completes."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise Dsv3Error(f"{target}: already exists (choose another output or remove it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _make_readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the finished checkpoint ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


class ShardWriter:
    """Writes tensors into numbered safetensors shards of about `max_shard_bytes`, then the index.

    Args:
        directory: where shards go (normally the temporary directory of atomic_directory).
        max_shard_bytes: start a new shard once this many bytes are buffered.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 4 << 30):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._buffer:
            raise ValueError(f"tensor {name} written twice")
        self._buffer[name] = tensor.contiguous().cpu()
        self._bytes += tensor.numel() * tensor.element_size()
        if self._bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        number = len(self._shards) + 1
        name = f"model-{number:05d}.safetensors"
        save_file(self._buffer, str(self.directory / name), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        for tensor_name in self._buffer:
            self.weight_map[tensor_name] = name
        self.total_bytes += self._bytes
        self._buffer, self._bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, give shards their final 'of N' names and write the index."""
        self._flush()
        count = len(self._shards)
        renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
        for old, new in renames.items():
            os.replace(self.directory / old, self.directory / new)
        self.weight_map = {k: renames[v] for k, v in self.weight_map.items()}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_config(directory: Path, config: dict) -> None:
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def copy_tokenizer_files(source: Path, directory: Path, names: Iterable[str] = TOKENIZER_FILES) -> None:
    for name in names:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(directory) / name)


def save_checkpoint(target: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                    tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 4 << 30,
                    overwrite: bool = False) -> Path:
    """Write a whole checkpoint (tensors, config.json, tokenizer files) atomically.

    Args:
        target: output directory (must not exist unless overwrite).
        tensors: stored name -> tensor, in the checkpoint's dtypes.
        config: the config.json contents.
        tokenizer_dir: copy tokenizer files from here.
        max_shard_bytes: shard size.
    Returns:
        The target path.
    """
    with atomic_directory(target, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finish()
        write_config(tmp, config)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return Path(target)
