"""Checkpoints that survive being killed: `output_dir/checkpoints/step-N`, published by rename.

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `step-N` only when every
file is in, so a folder named `step-N` is always complete; a kill during a save leaves a
`.tmp-*` folder that the next save removes, and the previous checkpoints untouched.

Contents: the model in the official layout (config.json + safetensors; loadable with
`CogVLMForCausalLM.from_pretrained`) or, for LoRA, a peft adapter folder; then through
`accelerator.save_state`: optimizer.bin, the scheduler (custom_checkpoint_0.pkl), the RNG states
of every process (random_states_R.pkl) and the grad scaler; last `trainer_state.json` (step,
micro-step = data position, elapsed seconds). Under FSDP and DeepSpeed, accelerate stores the
model in its own sharded format instead, and the official-layout copy is not written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from .config import TrainError
from .modes import load_weights, save_weights

STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"step-(\d+)")


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Published checkpoints (step-N folders with their state file), oldest first."""
    root = checkpoints_root(output_dir)
    found = [p for p in root.glob("step-*") if _STEP.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: Any, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: none (False), the latest in output_dir (True), or a path."""
    if resume in (False, None):
        return None
    if resume is True or resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def _model_is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def register_hooks(accelerator: Accelerator) -> None:
    """Keep accelerate from writing/reading its own model copy: we use the official layout."""
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep_last: int,
    shard_size: str = "5GB",
) -> Path:
    """Write step-N atomically (all processes call this), then keep only the last `keep_last`."""
    root = checkpoints_root(output_dir)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not _model_is_sharded(accelerator):
        save_weights(accelerator.unwrap_model(model), tmp, shard_size)
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        if final.exists():  # the same step saved before (a resumed run that had nothing to do)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, model: nn.Module, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG and scaler from `path`; returns trainer_state."""
    accelerator.load_state(str(path))
    if not _model_is_sharded(accelerator):
        load_weights(accelerator.unwrap_model(model), path)
    return json.loads((path / STATE_FILE).read_text())


__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "complete_checkpoints",
    "resolve_resume",
    "register_hooks",
    "STATE_FILE",
]
