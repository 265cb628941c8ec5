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

from ..config import CogVLMConfig
from ..errors import CheckpointError
from ..fileio import atomic_write, atomic_write_bytes, write_json

if TYPE_CHECKING:
    from ..model.cogvlm import CogVLMForCausalLM

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_INV_FREQ = "rotary_emb.inv_freq"
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


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
    raise CheckpointError(f"{folder}: no weights (model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX})")


_SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def iter_tensors(
    path: Path, device: torch.device | Callable[[str], torch.device], dtype: torch.dtype | None, mmap: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, floating tensors cast to `dtype` on `device`.

    When the file already holds `dtype` and the target is the CPU, tensors stay views of the
    memory map (zero copy: pages are read when first used). Otherwise each tensor is read with
    pread, converted, and its buffer freed, so a conversion never keeps the whole file resident.
    `device` may be a function of the tensor name (device maps; 'meta' for disk-offloaded ones),
    `dtype` None keeps the stored dtypes, and `mmap=False` reads safetensors with pread (quantisation: a
    full-precision tensor is freed once quantised instead of staying resident as mapped pages).
    """
    place = device if callable(device) else (lambda name: device)
    for name, tensor in _read(path, place, dtype, mmap):
        # Placement errors (no such device, out of memory) are the caller's, not the file's.
        yield name, tensor.to(device=place(name), dtype=dtype if tensor.is_floating_point() else None)


def _read(
    path: Path, place: Callable[[str], torch.device], dtype: torch.dtype | None, mmap: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs as stored; a file that cannot be read is named as corrupt."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                stored = {f.get_slice(k).get_dtype() for k in names}
            floats = stored & {"F64", "F32", "BF16", "F16"}
            zero_copy = (
                mmap and all(place(k).type in ("cpu", "meta") for k in names) and floats <= {_SAFE_DTYPES.get(dtype)}
            )
            with safe_open(str(path), framework="pt", backend="mmap" if zero_copy else "pread") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: not a state dict")
            yield from state.items()
    except (CheckpointError, GeneratorExit):
        raise
    except Exception as e:  # safetensors / pickle errors carry no file name; add it
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: corrupt or truncated weight file ({reason})") from None


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def check_keys(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor (inv_freq is optional)."""
    missing = [k for k in expected if k not in found and not k.endswith(_INV_FREQ)]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} != {list(expected[k])}" for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_names(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, '5GB' (10^9) or '2GiB' (2^30), as transformers reads max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"), re.I)
    if not m:
        raise ValueError(f"cannot read size '{size}' (e.g. 5GB, 500MB, 2GiB)")
    power = "_KMGT".index(m.group(2) or "_")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def save_state_dict(
    state: dict[str, torch.Tensor],
    folder: Path,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> None:
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
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=metadata))
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / name, lambda tmp, s=shard: save_file(s, tmp, metadata=metadata))
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def config_dict(config: CogVLMConfig, folder: Path) -> dict[str, Any]:
    """config.json's content for `folder`: `auto_map` only when the remote-code files it names are there."""
    data = config.to_dict()
    named = {ref.split(".")[0] + ".py" for ref in data.get("auto_map", {}).values()}
    if not all((folder / name).is_file() for name in named):
        data.pop("auto_map", None)
    return data


def save_model(
    model: "CogVLMForCausalLM", folder: str | Path, max_shard_size: int | str = "5GB", source: str | Path | None = None
) -> None:
    """config.json, generation_config.json and the weights, in the official layout.

    `source` (default: the folder the model was loaded from) lends its remote-code `.py` files and
    its generation_config.json. config.json keeps `auto_map` only when the files it names are in
    `folder` after that, so a folder that loaded with the official code before still does, and
    one that never had that code does not point at files that are not there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(source or getattr(model, "name_or_path", "") or folder)
    config = model.config.replace(torch_dtype=str(model.dtype).replace("torch.", ""))
    save_state_dict(model.state_dict(), folder, max_shard_size)
    written = config.to_dict()  # eos as config.json has it: CogVLM2's is the list [128001, 128009]
    generation = {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": written["eos_token_id"],
        "pad_token_id": config.pad_token_id,
        "transformers_version": written["transformers_version"],
    }
    if source.is_dir() and source.resolve() != folder.resolve():
        for code in source.glob("*.py"):
            atomic_write_bytes(folder / code.name, code.read_bytes())
        if (source / "generation_config.json").is_file():
            generation = json.loads((source / "generation_config.json").read_text())
    write_json(folder / "config.json", config_dict(config, folder))
    write_json(folder / "generation_config.json", generation)
