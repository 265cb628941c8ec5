"""Loading: what the user named turned into a ready model and tokenizer, in one place.

    >>> loaded = load(LoadOptions(model="THUDM/cogvlm-chat-hf", quantize="int8"))

A model reference is a folder or a hub id (`resolve`); the weights stream from the memory map
to their devices (`files`, `placement`), quantised on the way if asked (`quantize`). The Python
API, the drop-in `from_pretrained` and every command go through `load` / `load_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CogVLMConfig, get_preset
from ..errors import CheckpointError
from ..model.cogvlm import CogVLMForCausalLM
from ..tokenizer import load_tokenizer
from .files import resolve_dtype
from .packing import pack_linears
from .placement import DeviceMap, check_device, choose_setting, free_memory, load_placed, read_device_map
from .quantize import read_quantization

#: The shipped default model (trained by this project on synthetic scenes), inside the package.
DEFAULT_MODEL = Path(__file__).parent.parent / "assets" / "tiny-shapes"
#: transformers' GenerationConfig defaults for the fields a generation_config.json may leave out.
_HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class LoadOptions:
    """Everything that decides what is loaded and where; the CLI's loading flags map onto it."""

    model: str | Path | None = None  # folder or hub id; None: the shipped default model
    revision: str | None = None  # hub branch, tag or commit
    tokenizer: Any = None  # folder, hub id or tokenizer object; None: the rule in `resolve`
    local_files_only: bool | None = None  # hub: the cache only (HF_HUB_OFFLINE=1 does the same)
    dtype: torch.dtype | str | None = None  # None: bf16 on GPUs, fp32 elsewhere; 'auto': config.json's
    device: str | torch.device | None = "auto"
    device_map: str | DeviceMap | None = None  # 'auto', 'balanced', 'sequential', a dict or JSON text/file
    max_memory: dict[Any, Any] | None = None
    offload_folder: str | Path | None = None
    quantize: str | None = None  # 'int8', 'int4', 'nf4'
    quantize_vision: bool = False
    progress: bool = False
    pack: bool = True  # on the CPU, unquantised, fp32/bf16: linear weights prepacked for oneDNN (`packing`)

    def replace(self, **changes: Any) -> "LoadOptions":
        return LoadOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


@dataclass
class Loaded:
    """A loaded model with its tokenizer, folder, generation defaults and how it was placed."""

    model: nn.Module
    tokenizer: Any
    folder: Path
    generation: dict[str, Any] = field(default_factory=dict)
    placement: str = ""


def resolve_folder(model: str | Path | None, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """A local folder for a folder or hub id (downloaded into the hub cache); None: the default model."""
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CheckpointError("the default model is not in this installation; pass --model FOLDER_OR_HUB_ID")
        return DEFAULT_MODEL
    from .resolve import resolve_model

    return resolve_model(model, revision=revision, local_files_only=local_files_only)


def resolve_config(ref: str | Path | None) -> tuple[CogVLMConfig, str]:
    """The config of a folder, a hub id (config.json only is fetched), a preset, or 'default'."""
    if ref in (None, "default"):
        return CogVLMConfig.from_json(DEFAULT_MODEL / "config.json"), f"default model ({DEFAULT_MODEL.name})"
    if Path(ref).is_dir():
        return CogVLMConfig.from_json(Path(ref) / "config.json"), str(ref)
    from .resolve import is_hub_id, resolve_config_file

    if is_hub_id(ref):
        return CogVLMConfig.from_json(resolve_config_file(str(ref))), str(ref)
    return get_preset(str(ref)), f"preset {ref}"


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda, else mps, else cpu; anything else checked against this machine."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return check_device(device)


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None -> bf16 on CUDA cards that have it, fp16 on older ones, fp32 elsewhere."""
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def generation_defaults(folder: Path) -> dict[str, Any]:
    """Sampling defaults from the folder's generation_config.json, read as transformers reads it:
    fields it sets win, and when it turns sampling on, transformers' own defaults fill the rest
    (top_k 50 among them). `max_length` caps prompt + answer; token ids are the config's business."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    out = {**_HF_SAMPLING_DEFAULTS} if data.get("do_sample") else {}
    for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "max_length"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


def load_model(
    model: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    device_map: str | DeviceMap | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
    progress: bool = False,
    model_class: type[nn.Module] = CogVLMForCausalLM,
) -> nn.Module:
    """The network alone (no tokenizer): `dtype` None keeps float32 as transformers does, 'auto'
    takes config.json's; `device` None is the CPU. See `LoadOptions` for the rest."""
    folder = resolve_folder(model, revision, local_files_only)
    config = CogVLMConfig.from_json(folder / "config.json")
    net = load_placed(
        folder,
        config,
        resolve_dtype(dtype, config),
        device,
        device_map=read_device_map(device_map),
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantize=quantize,
        quantize_vision=quantize_vision,
        progress=progress,
        model_class=model_class,
    )
    net.name_or_path = str(folder)  # where save_pretrained finds the remote-code files to keep
    return net


def load(options: LoadOptions = LoadOptions(), model_class: type[nn.Module] = CogVLMForCausalLM) -> Loaded:
    """Model, tokenizer and generation defaults for `options`. The tokenizer is resolved first (it
    is cheap and its absence is the common failure). With device 'auto', no map and no
    quantisation on a GPU machine, `choose_setting` picks what fits, reading how the folder is
    quantised; `Loaded.placement` says what it chose."""
    folder = resolve_folder(options.model, options.revision, options.local_files_only)
    tokenizer = options.tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from .resolve import resolve_tokenizer

        tokenizer = load_tokenizer(resolve_tokenizer(tokenizer, folder, local_files_only=options.local_files_only))
    config = CogVLMConfig.from_json(folder / "config.json")
    where = pick_device(options.device)
    dtype = pick_dtype(where, options.dtype)
    placement = {
        "device": where,
        "device_map": options.device_map,
        "max_memory": options.max_memory,
        "quantize": options.quantize,
        "quantize_vision": options.quantize_vision,
    }
    note = ""
    automatic = options.device in (None, "auto") and options.device_map is None and options.quantize is None
    if automatic and where.type == "cuda":
        saved = read_quantization(folder)
        placement, note = choose_setting(
            config, free_memory(), resolve_dtype(dtype, config), saved=saved and saved["method"]
        )
        placement["quantize_vision"] = saved["quantize_vision"] if saved else placement["quantize_vision"]
    net = load_model(
        folder,
        dtype,
        offload_folder=options.offload_folder,
        progress=options.progress,
        model_class=model_class,
        **placement,
    )
    whole_on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    if options.pack and whole_on_cpu and not placement.get("device_map") and not placement.get("quantize"):
        pack_linears(net)
    return Loaded(net, tokenizer, folder, generation_defaults(folder), note)


__all__ = [
    "LoadOptions",
    "Loaded",
    "load",
    "load_model",
    "resolve_folder",
    "resolve_config",
    "pick_device",
    "pick_dtype",
    "generation_defaults",
    "DEFAULT_MODEL",
]
