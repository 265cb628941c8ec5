"""The processes a launcher (`torchrun`, `accelerate launch`) starts: this process's place among
them and the few collectives the batch and eval jobs need.

The launcher sets RANK, WORLD_SIZE and LOCAL_RANK; `join` makes the processes a torch.distributed
group. It only carries barriers and small picklable objects, so it is gloo on every machine (no
GPU collective is needed). Without a launcher, or with one process, every call is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as dist

#: How long a process waits for the slowest one: shards of a resumed job can be very unequal.
WAIT = datetime.timedelta(hours=24)


#: Whether this process joined a group through `join` (set once; `end_process` acts on it).
_joined = False


def join() -> bool:
    """Join the launcher's process group when WORLD_SIZE > 1 and none is joined yet; True if joined here."""
    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=WAIT)
    _joined = True
    return True


def joined() -> bool:
    """Whether this process joined a launcher's group (it may have left it since)."""
    return _joined


def end_process(code: int) -> NoReturn:
    """End a process that was in a launcher's group with `code`, once its job is done and written:
    output flushed, then `os._exit`, so the interpreter's C++ teardown never runs. Even after the
    group was left cleanly (`leave`), CI saw a rank abort there now and then ("terminate called
    without an active exception": a thread of the gloo group destroyed while still joinable), which
    turned a finished job into a failed one."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def leave(clean: bool = True) -> None:
    """Leave the process group. `clean` (the job ended normally): meet the others first, so no
    process tears its group down while another is still in a collective (CI once saw one abort
    at exit, "terminate called without an active exception"); after a failure, leave at once."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_gpu(device: str | None) -> str | None:
    """`device`, except that 'auto', 'cuda' (or None) under a multi-process launch on a CUDA machine
    is this process's own GPU (LOCAL_RANK), so that the processes do not all load onto GPU 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return device


def barrier() -> None:
    """Wait until every process gets here."""
    if world()[1] > 1:
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order, on every process."""
    size = world()[1]
    if size == 1:
        return [value]
    values: list[Any] = [None] * size
    dist.all_gather_object(values, value)
    return values


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` (picklable), on every process."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
