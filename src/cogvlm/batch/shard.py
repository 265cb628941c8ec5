"""All GPUs of a machine: one shard of the ids per process, under torchrun or accelerate launch.

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK. Process r answers the ids whose stable hash is
r modulo the number of processes: a hash of the id alone, so the split depends neither on the input
order nor on what is already done, and a rerun with another number of processes splits what is
left anew. The processes meet through torch.distributed on gloo (no GPU needed, no tensors sent):
after --overwrite has cleared the output, and at the end, before process 0 merges the journals.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ..launcher import local_gpu


def shard_of(item_id: str, world: int) -> int:
    """The process (0 .. world-1) that answers this id."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % world


@dataclass(frozen=True)
class Shard:
    """This process's place among the launcher's processes (0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Shard":
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.world) == self.rank

    def place(self, options: Any) -> Any:
        """LoadOptions putting this process on its own GPU (LOCAL_RANK) when there are several
        processes and GPUs and no explicit placement; the options unchanged otherwise."""
        device = options.device if options.device_map is not None else local_gpu(options.device)
        return options if device == options.device else options.replace(device=device)
