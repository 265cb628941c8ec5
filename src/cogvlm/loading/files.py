"""Official checkpoint folders: find the weight files, load them strictly, save them back.

Loading builds the model on the meta device and fills it tensor by tensor from memory-mapped
files (safetensors, or `.bin` through `torch.load(mmap=True, weights_only=True)`), so the peak
memory stays near the size of the weights. Keys are the official names; one error lists every
missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import CogVLMConfig
from .errors import CheckpointError
from .fileio import atomic_write, write_json

if TYPE_CHECKING:
    from .model.cogvlm import CogVLMForCausalLM

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_INV_FREQ = "rotary_emb.inv_freq"
_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, config: CogVLMConfig | None = None) -> torch.dtype:
    """torch dtype from a dtype, a name ('bf16', 'float16', ...) or 'auto' (config.json's)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" and config is not None else dtype
    try:
        return _DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise CheckpointError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)") from None


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files, preferring safetensors; an index names the shards."""
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: not a valid weight index (no weight_map)") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) not in the folder: {', '.join(missing)}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights (model.safetensors, {SAFE_INDEX}, "
                          f"pytorch_model.bin or {BIN_INDEX})")


_SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def iter_tensors(path: Path, device: torch.device | Callable[[str], torch.device], dtype: torch.dtype | None,
                 mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, floating tensors cast to `dtype` on `device`.

    When the file already holds `dtype` and the target is the CPU, tensors stay views of the
    memory map (zero copy: pages are read when first used). Otherwise each tensor is read with
    pread, converted, and its buffer freed, so a conversion never keeps the whole file resident.
    `device` may be a function of the tensor name (device maps; 'meta' for disk-offloaded ones),
    `dtype` None keeps the stored dtypes, and `mmap=False` reads safetensors with pread (quantisation: a
    full-precision tensor is freed once quantised instead of staying resident as mapped pages).
    """
    place = device if callable(device) else (lambda name: device)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                stored = {f.get_slice(k).get_dtype() for k in names}
            floats = stored & {"F64", "F32", "BF16", "F16"}
            zero_copy = (mmap and all(place(k).type in ("cpu", "meta") for k in names)
                         and floats <= {_SAFE_DTYPES.get(dtype)})
            with safe_open(str(path), framework="pt", backend="mmap" if zero_copy else "pread") as f:
                for name in names:
                    yield name, _cast(f.get_tensor(name), place(name), dtype)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: not a state dict")
            for name, tensor in state.items():
                yield name, _cast(tensor, place(name), dtype)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / pickle errors carry no file name; add it
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({reason})") from None


def _cast(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor (inv_freq is optional)."""
    missing = [k for k in expected if k not in found and not k.endswith(_INV_FREQ)]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} != {list(expected[k])}" for k in expected
             if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_names(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))


def load_model(folder: str | Path, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, *, progress: bool = False,
               low_cpu_mem_usage: bool = True, trust_remote_code: bool = True,
               device_map: str | dict[str, Any] | None = None, max_memory: dict[Any, Any] | None = None,
               offload_folder: str | Path | None = None, quantize: str | None = None,
               quantize_vision: bool = False) -> "CogVLMForCausalLM":
    """Build on the meta device, then fill every tensor straight from the memory-mapped files.

    `dtype` None keeps float32 (as transformers does); 'auto' uses config.json's torch_dtype.
    `progress` shows a bar (stderr) over the tensors read.
    The official call's `low_cpu_mem_usage` and `trust_remote_code` are accepted and have no
    effect: loading is always lean and there is no remote code.
    `device_map` ('auto', 'balanced', 'sequential' or a dict; replaces `device`), `max_memory`,
    `offload_folder`, `quantize` ('int8', 'int4', 'nf4') and `quantize_vision`: see
    `cogvlm.dispatch.load_placed`; a folder written by `cogvlm quantize` is detected by itself.
    """
    from .model.cogvlm import CogVLMForCausalLM
    from .model.decoder import rotary_inv_freq

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder")
    config = CogVLMConfig.from_json(folder / "config.json")
    dtype = resolve_dtype(dtype, config)
    # ---- device maps and quantisation live in cogvlm.dispatch / cogvlm.quantize --------------
    from .quantize import read_quantization

    if device_map is not None or quantize is not None or read_quantization(folder) is not None:
        from .dispatch import load_placed
        return load_placed(folder, config, dtype, device, device_map=device_map, max_memory=max_memory,
                           offload_folder=offload_folder, quantize=quantize,
                           quantize_vision=quantize_vision, progress=progress)
    # ------------------------------------------------------------------------------------------
    device = torch.device(device or "cpu")
    files = weight_files(folder)
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress,
               leave=False)
    for path in files:
        for name, tensor in iter_tensors(path, device, dtype):
            state[name] = tensor
            bar.update()
    bar.close()
    check_keys(expected, {k: v.shape for k, v in state.items()}, str(files[0].parent / files[0].name)
               if len(files) == 1 else f"{folder} ({len(files)} shards)")
    for name in expected:  # checkpoints without inv_freq: compute it as the official init would
        if name.endswith(_INV_FREQ) and name not in state:
            state[name] = rotary_inv_freq(config.head_dim, dtype).to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, '5GB' (10^9) or '2GiB' (2^30), as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"), re.I)
    if not m:
        raise ValueError(f"cannot read size '{size}' (e.g. 5GB, 500MB, 2GiB)")
    power = "_KMGT".index(m.group(2) or "_")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB",
                    metadata: dict[str, str] | None = None) -> None:
    """Write safetensors shards (+ index when more than one) the way transformers names them;
    `metadata` goes into every shard's header (quantised checkpoints describe their tensors there)."""
    metadata = {"format": "pt", **(metadata or {})}
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    for stale in list(folder.glob("model*.safetensors")) + [folder / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        atomic_write(folder / "model.safetensors",
                      lambda tmp: save_file(shards[0], tmp, metadata=metadata))
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda tmp, s=shard: save_file(s, tmp, metadata=metadata))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_model(model: "CogVLMForCausalLM", folder: str | Path, max_shard_size: int | str = "5GB") -> None:
    """config.json, generation_config.json and the weights, in the official layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(torch_dtype=str(model.dtype).replace("torch.", ""))
    save_state_dict(model.state_dict(), folder, max_shard_size)
    write_json(folder / "config.json", config.to_dict())
    write_json(folder / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "transformers_version": "4.35.0"})
