"""Data-parallel evaluation under `torchrun` / `accelerate launch`: which process this is, its
share of the questions, and the two collectives a run needs (a barrier, and rank 0's result).

The launcher starts one process per GPU (or per CPU worker) and sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_from_env` joins them into a torch.distributed group. The group only carries
a barrier and one small object, so it uses gloo on every machine (no GPU collective is needed).
The questions still to ask are dealt out by id, round robin in the task's order: process r of n
asks the r-th, (r+n)-th, ... unanswered question. All processes read the answers on disk between
two barriers, so they agree on what is left and every question goes to exactly one of them; a
rerun with another number of processes deals out what is left evenly again. Without a launcher
(or with one process) all of this is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

#: Processes wait at the barrier for the slowest one: allow for shards of very unequal work
#: (a resumed run may have answered most of one process's questions and few of another's).
BARRIER_TIMEOUT = datetime.timedelta(hours=24)

T = TypeVar("T")


def init_from_env() -> bool:
    """Join the launcher's process group when WORLD_SIZE > 1 and none is joined yet; True if joined here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return True


def shutdown() -> None:
    """Leave the process group (after the run, so the launcher sees a clean exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for_rank(device: str | None) -> str | None:
    """`device`, except that 'auto' (or None) under a multi-process launch on a CUDA machine is
    this process's own GPU (LOCAL_RANK), so that the processes do not all load onto GPU 0."""
    rank, size = world()
    if size > 1 and device in (None, "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return device


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """The items that process `rank` of `size` asks: every size-th one from position `rank`."""
    return list(items[rank::size])


def barrier() -> None:
    """Wait until every process gets here (no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()


def from_rank0(value: Any) -> Any:
    """Rank 0's `value`, on every process (a picklable object; no-op in one process)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
