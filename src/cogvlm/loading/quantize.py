"""Weight-only quantisation (int8, int4, nf4) of the Linear layers, one module at a time.

Backends are maintained kernels, picked by the device a layer lives on:
- int8: torchao `Int8Tensor` (per-row symmetric) on every device; serialisable.
- int4: torchao group-wise asymmetric int4 (group 128, or 64 / 32 for narrow layers): the
  tinygemm CPU kernel on CPU (`Int4OpaqueTensor`), tinygemm CUDA on GPUs (Ampere+, bf16).
- nf4: bitsandbytes `Linear4bit` on CUDA (the library of the official 4-bit recipe); torchao
  `NF4Tensor` on CPU (dequantises on every call: a portable reference, not a fast path).
`lm_head` is never quantised (its error lands straight in the logits), and the vision side (ViT
and adapter) keeps the compute dtype unless `quantize_vision`. Layers are quantised while their
weights stream in from the memory map (`cogvlm.loading.placement.load_placed`), so the full-precision
model never exists. `cogvlm quantize` saves torchao's own safetensors layout where the backend
can serialise (int8 anywhere, int4 made on CUDA) and records it as `quantization_config` in
config.json; `load_model` reads that field itself (the config reader ignores it).
"""

from __future__ import annotations

import ctypes
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, SettingsError
from .files import iter_tensors

METHODS = ("int8", "int4", "nf4")
#: Approximate bytes per quantised weight, scales included (memory estimates and planning).
BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5 + 4 / 128, "nf4": 0.5 + 4 / 64}
FORMAT = "torchao-safetensors"
_INT4_GROUPS = (128, 64, 32)  # the tinygemm kernels' group sizes, largest (smallest overhead) first
_NF4_BLOCK = 64  # NF4's block size (QLoRA); its absmax scalers are quantised in blocks of <= 256


def check_method(method: str) -> str:
    """The method, if it is one of METHODS (a one-line error otherwise)."""
    if method not in METHODS:
        raise SettingsError(f"unknown quantisation '{method}' (use {', '.join(METHODS)})")
    return method


def is_target(name: str, module: nn.Module, quantize_vision: bool = False) -> bool:
    """Whether the module `name` is quantised: every Linear but lm_head, the vision side only on request."""
    return (
        isinstance(module, nn.Linear)
        and name != "lm_head"
        and (quantize_vision or not name.startswith("model.vision."))
    )


def backend_name(method: str, device: torch.device) -> str:
    """The library and kernel that serve `method` on `device` (for messages and docs)."""
    if device.type == "cuda":
        return {"int8": "torchao int8 weight-only", "int4": "torchao tinygemm int4", "nf4": "bitsandbytes nf4"}[method]
    return {"int8": "torchao int8 weight-only", "int4": "torchao tinygemm-cpu int4", "nf4": "torchao NF4Tensor"}[method]


@contextmanager
def quiet_logs(*names: str) -> Iterator[None]:
    """Silence these libraries' warnings for a block: torchao warns about every optional kernel
    library it cannot load, accelerate about every planned GPU this machine lacks."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_module(module: nn.Linear, method: str) -> nn.Module:
    """Quantise one Linear where its weight lives; returns the module to use in its place
    (the same one for torchao, a bitsandbytes module for nf4 on CUDA). A layer whose width no
    kernel supports is returned unchanged."""
    weight = module.weight.detach()
    if method == "nf4" and weight.device.type == "cuda":
        return _bnb_nf4(module)
    with quiet_logs("torchao", "torch.utils._pytree"):
        if method == "nf4":
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

            if weight.numel() % _NF4_BLOCK:
                return module
            n_blocks = weight.numel() // _NF4_BLOCK
            scaler_block = next(s for s in (256, 128, 64, 32, 16, 8, 4, 2, 1) if n_blocks % s == 0)
            module.weight = nn.Parameter(to_nf4(weight, _NF4_BLOCK, scaler_block), requires_grad=False)
            return module
        from torchao.quantization import quantize_

        config = _torchao_config(method, module.in_features, weight.device)
        if config is not None:
            quantize_(module, config)
    return module


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). glibc raises
    its mmap threshold as large blocks are freed, so later full-precision buffers land on the heap
    and stay resident once freed: without this, quantising on the CPU peaks at about the
    full-precision size (measured on bench-490) instead of the quantised one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _torchao_config(method: str, in_features: int, device: torch.device) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if method == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    group = next((g for g in _INT4_GROUPS if in_features % g == 0), None)
    if group is None:
        return None
    if device.type == "cuda":
        return Int4WeightOnlyConfig(
            group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)


def _bnb_nf4(module: nn.Linear) -> nn.Module:
    """bitsandbytes 4-bit NF4, computing in the weight's dtype (the CUDA path; bitsandbytes >= 0.45
    also runs it on CPU, which is how the tests check this swap)."""
    import bitsandbytes as bnb

    weight = module.weight.detach()
    quantized = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(weight.device)
    if module.bias is not None:
        quantized.bias = module.bias
    return quantized


# ---- memory --------------------------------------------------------------------------------


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a torchao tensor's packed data and scales, not its logical shape
    (bitsandbytes' packed data are a plain uint8 tensor; their small absmax is not counted)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        return sum(storage_bytes(getattr(tensor, n)) for n in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def quantized_dtypes(model: nn.Module, quantize: str | None, quantize_vision: bool = False) -> dict[str, Any]:
    """accelerate's `special_dtypes` for the weights a quantisation shrinks."""
    from accelerate.utils import CustomDtype

    if quantize is None:
        return {}
    dtype = torch.int8 if check_method(quantize) == "int8" else CustomDtype.INT4
    return {f"{n}.weight": dtype for n, m in model.named_modules() if is_target(n, m, quantize_vision)}


def weight_bytes(model: nn.Module, dtype_bytes: int, quantize: str | None = None, quantize_vision: bool = False) -> int:
    """Parameter memory of a (meta) model in a dtype, quantised weights with their scales."""
    total = 0.0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            quantized = quantize is not None and pname == "weight" and is_target(name, module, quantize_vision)
            total += p.numel() * (BYTES_PER_WEIGHT[quantize] if quantized else dtype_bytes)
    return int(total)


# ---- saved checkpoints ----------------------------------------------------------------------


def read_quantization(folder: str | Path) -> dict[str, Any] | None:
    """The `quantization_config` a `cogvlm quantize` folder records in config.json, else None."""
    path = Path(folder) / "config.json"
    try:
        record = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # the config reader reports unreadable configs
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("method") not in METHODS:
        raise CheckpointError(
            f"{path}: quantization_config is not one cogvlm wrote "
            f"(expected format '{FORMAT}'); load the full-precision folder instead"
        )
    return record


def torchao_serialisation() -> tuple[Callable, Callable, Sequence[str]]:
    with quiet_logs("torchao", "torch.utils._pytree"):
        from torchao.prototype.safetensors.safetensors_support import (
            flatten_tensor_state_dict,
            unflatten_tensor_state_dict,
        )
        from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
    return flatten_tensor_state_dict, unflatten_tensor_state_dict, ALLOWED_TENSORS_SUBCLASSES


def iter_quantized_checkpoint(
    files: Sequence[Path], place: Callable[[str], torch.device], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a saved quantised checkpoint: quantised weights rebuilt by torchao
    from their parts (as they complete, one weight at a time), other tensors cast to `dtype`."""
    _, unflatten, _ = torchao_serialisation()
    metadata: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            metadata.update(f.metadata() or {})
    owner: dict[str, str] = {}  # stored part -> the weight it belongs to
    for name in json.loads(metadata.get("tensor_names", "[]")):
        info = json.loads(metadata[name])
        if info["_type"] != "Tensor":
            module, _, attr = name.rpartition(".")
            owner.update({f"{module}._{attr}_{part}": name for part in info["_tensor_data_names"]})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in files:
        for key, tensor in iter_tensors(path, torch.device("cpu"), None, mmap=False):
            name = owner.get(key)
            if name is None:
                yield key, tensor.to(device=place(key), dtype=dtype if tensor.is_floating_point() else None)
                continue
            parts.setdefault(name, {})[key] = tensor
            if len(parts[name]) == len(json.loads(metadata[name])["_tensor_data_names"]):
                rebuilt, _ = unflatten(parts.pop(name), {"tensor_names": json.dumps([name]), name: metadata[name]})
                yield name, rebuilt[name].to(place(name))
    if parts:
        raise CheckpointError(f"{files[0].parent}: incomplete quantised tensors: {', '.join(sorted(parts))}")
