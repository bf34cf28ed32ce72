"""torch.distributed plumbing: who this process is and the process group.

Nothing here knows the model. The launcher (torchrun) sets RANK, LOCAL_RANK and
WORLD_SIZE; the process-group backend (nccl, hccl, gloo) comes from the hardware
backend's capabilities, never from a branch on the hardware. Every helper is a
no-op in a single process, so commands call them unconditionally.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dsv3.errors import Dsv3Error


@dataclass(frozen=True)
class Launch:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 owns the terminal).
        local_rank: rank on this node: the accelerator index it drives.
        world_size: processes in the job.
    """

    rank: int
    local_rank: int
    world_size: int


def launch() -> Launch:
    """The job as the process group sees it, or as torchrun's environment describes it before init."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return Launch(rank, int(os.environ.get("LOCAL_RANK", rank)), world)
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise Dsv3Error(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers (set by torchrun): {e}") from e
    if not 0 <= rank < world:
        raise Dsv3Error(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank, local, world)


def is_primary() -> bool:
    """Whether this process is rank 0 (true in a single process)."""
    return launch().rank == 0


def is_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_device(device: str | torch.device, local_rank: int) -> str:
    """The device of this rank: an accelerator device without an index gets LOCAL_RANK's."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None:
        return str(device)
    return f"{device.type}:{local_rank}"


def init(dist_backend: str, device: torch.device) -> None:
    """Join the process group (once); the job's environment comes from torchrun.

    Args:
        dist_backend: "nccl", "hccl" or "gloo", from the backend's capabilities.
        device: this rank's device; an accelerator becomes the current device (NCCL/HCCL need it).
    """
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)
    if dist.is_initialized():
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise Dsv3Error(f"{', '.join(missing)} not set: launch several processes with torchrun "
                        "(torchrun --nproc-per-node N -m dsv3 ...)")
    try:
        dist.init_process_group(backend=dist_backend)
    except (RuntimeError, ValueError) as e:
        raise Dsv3Error(f"cannot start the {dist_backend} process group: {e}") from e
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- collectives on activations ---------------------------------------------------------

def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum x over the group's ranks, in place; returns x."""
    dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's x [..., n] along the last dim, in rank order: [..., n x ranks]."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order ([value] in a single process)."""
    if not is_parallel():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
