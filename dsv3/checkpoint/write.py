"""Writing checkpoints in the Hugging Face layout, all or nothing.

Output goes to a temporary directory beside the target and is renamed into
place only when every file is complete, so an interrupted write leaves no
half-written checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.checkpoint.read import INDEX_FILE
from dsv3.errors import Dsv3Error, Terminated

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


PARTIAL, ASIDE = "partial", "old"


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target` that becomes `target` only if the block completes.

    With overwrite, an existing target is replaced without a moment where neither the old nor the
    new checkpoint exists: the old one is renamed aside, the new one renamed in, then the old one
    deleted. SIGTERM is handled like Ctrl-C while the block runs: the temporary directory goes.
    Directories left by a killed run (`.NAME.partial-PID-*`) are removed first; one whose process
    still runs is an error.

    Raises:
        Dsv3Error: target exists (without overwrite), is not a directory, or another run writes it.
    """
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{PARTIAL}-{os.getpid()}-", dir=target.parent))
    try:
        with _sigterm_interrupts():
            yield tmp
        with _signals_deferred():  # from here the result is whole: a signal must not report failure over it
            _make_readable(tmp)
            _replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a file or link, or that exists without overwrite, before any work is done."""
    if target.is_symlink():
        raise Dsv3Error(f"{target}: is a symbolic link; give the directory itself as the output")
    if target.exists() and not target.is_dir():
        raise Dsv3Error(f"{target}: exists and is not a directory; choose another output")
    if target.exists() and not overwrite:
        raise Dsv3Error(f"{target}: already exists (choose another output, or pass --overwrite to replace it)")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise Dsv3Error(f"{target}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Dsv3Error(f"{target}: cannot be created, {parent} is not writable")


def is_checkpoint_dir(path: Path) -> bool:
    """A directory dsv3 or Hugging Face wrote: config.json and safetensors weights."""
    return (path / "config.json").is_file() and (
        (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))


def remove_stale(target: Path) -> None:
    """Remove `.NAME.partial-*` directories of killed runs; refuse while another live run writes `target`,
    and name an old copy a run killed mid-replace left aside instead of deleting it."""
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.{PARTIAL}-*")):
        pid = path.name.removeprefix(f".{target.name}.{PARTIAL}-").split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            raise Dsv3Error(f"{target}: process {pid} is writing it ({path.name}); wait for it, "
                            f"or remove {path} if that process is not dsv3")
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.{ASIDE}-*")):
        now = "the new one is in place" if target.exists() else f"no {target.name} is in place"
        raise Dsv3Error(f"{path}: the previous checkpoint of {target}, set aside by a run killed while replacing "
                        f"it ({now}); move it back or delete it, then run again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is renamed aside first and deleted last."""
    if not target.exists():
        os.rename(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{ASIDE}-{os.getpid()}-", dir=target.parent))
    os.rename(target, aside / target.name)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside / target.name, target)
        aside.rmdir()
        raise
    # the new checkpoint is in place: the old one is garbage now, renamed so that a run after a kill
    # mid-delete removes it (as a partial directory) instead of asking the user to move it back
    garbage = Path(tempfile.mkdtemp(prefix=f".{target.name}.{PARTIAL}-{os.getpid()}-", dir=target.parent))
    os.rename(aside, garbage / "old")
    shutil.rmtree(garbage)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C wait until the block is done (the final rename and cleanup: a few system calls)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print("dsv3: the output was complete when the signal came; finished", file=sys.stderr)


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the finished checkpoint's directory ordinary permissions.
    Files keep theirs: written ones got the umask's, copied ones the source's (a private file stays private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


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
        renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{count:05d}.safetensors"
                   for i in range(1, count + 1)}
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
