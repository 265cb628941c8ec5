"""Data-parallel evaluation under `torchrun` / `accelerate launch`: each process's share of the
questions (the processes and their collectives are `cogvlm.launcher`'s).

The questions still to ask are dealt out by id, round robin in the task's order: process r of n
asks the r-th, (r+n)-th, ... unanswered question. All processes read the answers on disk between
two barriers, so they agree on what is left and every question goes to exactly one of them; a
rerun with another number of processes deals out what is left evenly again. Without a launcher
(or with one process) all of this is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """The items that process `rank` of `size` asks: every size-th one from position `rank`."""
    return list(items[rank::size])
