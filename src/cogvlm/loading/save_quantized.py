"""`cogvlm quantize`: write a quantised checkpoint folder in torchao's safetensors layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CogVLMConfig
from ..errors import CheckpointError, SettingsError
from ..fileio import write_json
from .files import BIN_INDEX, SAFE_INDEX, config_dict, resolve_dtype, save_state_dict
from .placement import load_placed
from .quantize import FORMAT, backend_name, check_method, quantize_module, read_quantization, torchao_serialisation


def quantize_checkpoint(
    folder: str | Path,
    out: str | Path,
    method: str,
    *,
    quantize_vision: bool = False,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    max_shard_size: int | str = "5GB",
    progress: bool = False,
    revision: str | None = None,
) -> dict[str, Any]:
    """Quantise a full-precision folder into `out` (weights, config.json with quantization_config,
    tokenizer and generation files copied). The model is quantised while it loads; each tensor is
    then flattened into torchao's parts and freed, so memory peaks near the quantised size."""
    from . import resolve_folder

    folder, out = resolve_folder(folder, revision), Path(out)
    check_method(method)
    if read_quantization(folder) is not None:
        raise CheckpointError(f"{folder}: already quantised")
    if out.resolve() == folder.resolve():
        raise CheckpointError("write the quantised checkpoint to another folder")
    config = CogVLMConfig.from_json(folder / "config.json")
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    flatten, _, allowed = torchao_serialisation()
    probe = quantize_module(nn.Linear(128, 128, bias=False, device=device, dtype=dtype), method).weight
    if type(probe).__name__ not in allowed:  # ask the backend itself, before the long load
        raise SettingsError(
            f"{method} on {device.type} ({backend_name(method, device)}) cannot be saved "
            f"({type(probe).__name__} has no serialisation): quantise while loading "
            "(--quantize) instead"
        )
    model = load_placed(
        folder, config, dtype, device, quantize=method, quantize_vision=quantize_vision, progress=progress
    )
    state = model.state_dict()
    del model
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name in list(state):
        data, meta = flatten({name: state.pop(name)})  # the original is freed once flattened
        tensors.update(data)
        metadata[name] = meta[name]
    metadata["tensor_names"] = json.dumps(list(metadata))
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, out, max_shard_size, metadata=metadata)
    record = {
        "format": FORMAT,
        "method": method,
        "quantize_vision": quantize_vision,
        "backend": backend_name(method, device),
    }
    for extra in folder.iterdir():  # tokenizer, generation config, remote code, README ...
        if (
            extra.is_file()
            and extra.name not in (SAFE_INDEX, BIN_INDEX, "config.json")
            and extra.suffix not in (".safetensors", ".bin")
        ):
            shutil.copy2(extra, out / extra.name)
    config = config.replace(torch_dtype=str(dtype).replace("torch.", ""))
    write_json(out / "config.json", {**config_dict(config, out), "quantization_config": record})
    return {**record, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
