"""Device maps: plan with accelerate, place tensors straight from the memory map, dispatch.

A plan keeps every `CogVLMDecoderLayer` and `TransformerLayer` (and the patch embedding, the adapter) whole,
as the official recipe does. Loading streams each tensor from the memory-mapped files to its
device: GPU and CPU entries are filled in place, disk entries of safetensors checkpoints are
never copied (accelerate reads them from the original file at each call; `.bin` ones are written to
`offload_folder`), and quantised layers are quantised as their weight arrives. Then accelerate's
hooks move activations between devices. `choose_setting` picks what fits a GPU budget.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CogVLMConfig
from ..errors import SettingsError
from ..model.cogvlm import CogVLMForCausalLM, on_meta
from ..model.decoder import rotary_inv_freq
from .files import check_keys, iter_tensors, parse_size, weight_files
from .quantize import (
    check_method,
    is_target,
    iter_quantized_checkpoint,
    quantize_module,
    quantized_dtypes,
    quiet_logs,
    read_quantization,
    release_freed_memory,
    weight_bytes,
)

#: Modules a plan never splits: the official two, plus the patch embedding (its position table
#: is read, not called, so it must sit with the module that reads it) and the small GLU adapter
#: (so boi and eoi can follow its output, see `_vision_glue`).
NO_SPLIT = ["CogVLMDecoderLayer", "TransformerLayer", "PatchEmbedding", "GLU"]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
GPU_SHARE = 0.9  # of a GPU's free memory, for weights when no max_memory is given (as transformers)

DeviceMap = dict[str, Any]


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0=24GiB,1=24GiB,cpu=64GiB' -> {0: bytes, 1: bytes, 'cpu': bytes}."""
    budgets: dict[int | str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, size = (s.strip().removeprefix("cuda:") for s in item.partition("="))
        if not sep or not (key.isdigit() or key in ("cpu", "mps")):
            raise ValueError(f"bad max-memory entry '{item}' (e.g. 0=24GiB,1=24GiB,cpu=64GiB)")
        budgets[int(key) if key.isdigit() else key] = parse_size(size)
    return budgets


def _budgets(max_memory: dict[Any, Any] | None) -> dict[int | str, int]:
    """max_memory with sizes in bytes; None: what accelerate finds free, GPUs at GPU_SHARE."""
    from accelerate.utils import get_max_memory

    if max_memory is not None:
        return {k: parse_size(v) for k, v in max_memory.items()}
    return {k: int(v * GPU_SHARE) if isinstance(k, int) else v for k, v in get_max_memory().items()}


def main_device(device_map: DeviceMap) -> int | str:
    """Where offloaded weights run and inputs enter: the first GPU of the map, else the CPU."""
    return next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")


def plan_device_map(
    model: nn.Module,
    strategy: str = "auto",
    max_memory: dict[Any, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> DeviceMap:
    """A device map for a (meta) model: 'auto' / 'balanced' spread evenly over the GPUs (as
    transformers), 'balanced_low_0' keeps GPU 0 light, 'sequential' fills devices in order (the
    official recipe); then CPU, then disk. Budgets are taken as given, so plans for GPUs this
    machine lacks work."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in STRATEGIES:
        raise SettingsError(f"unknown device map '{strategy}' (use {', '.join(STRATEGIES)} or a dict)")
    budgets = _budgets(max_memory)
    special = quantized_dtypes(model, quantize, quantize_vision)
    with quiet_logs("accelerate.utils.modeling"):
        if strategy != "sequential":
            budgets = get_balanced_memory(
                model,
                dict(budgets),
                NO_SPLIT,
                dtype=dtype,
                special_dtypes=special,
                low_zero=strategy == "balanced_low_0",
            )
        device_map = infer_auto_device_map(model, budgets, NO_SPLIT, dtype=dtype, special_dtypes=special)
    return _vision_glue(device_map)


def _vision_glue(device_map: DeviceMap) -> DeviceMap:
    """boi and eoi are parameters used, not modules called: no hook brings them in, so when the
    vision tower is split they sit, loaded, where the adapter's output is computed."""
    adapter = device_map.get("model.vision.linear_proj")
    for name in ("model.vision.boi", "model.vision.eoi"):
        if adapter is not None and name in device_map:
            device_map[name] = main_device(device_map) if adapter in ("cpu", "disk") else adapter
    return device_map


def _entry(device_map: DeviceMap, name: str) -> str | None:
    """The map key covering tensor `name` (the longest module prefix), None when none does."""
    parts = name.split(".")
    keys = (".".join(parts[:i]) for i in range(len(parts), -1, -1))
    return next((k for k in keys if k in device_map), None)


def check_device_map(model: nn.Module, device_map: DeviceMap) -> None:
    """Every tensor placed, every device real: one error naming the modules a map leaves out."""
    left_out = sorted({name.rpartition(".")[0] for name in model.state_dict() if _entry(device_map, name) is None})
    if left_out:
        raise SettingsError(
            f"the device map places no device for {len(left_out)} module(s): {_compress(left_out)} "
            "(add them, or an entry for a module that holds them)"
        )
    for value in set(device_map.values()):
        if value != "disk":
            check_device(torch.device("cuda", value) if isinstance(value, int) else value)


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine and torch build have it; else one line saying why not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingsError(f"unknown device '{device}' (use cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise SettingsError(
                f"device {device} asked for, but this torch ({torch.__version__}) is a CPU-only "
                "build: install a CUDA build of torch (pytorch.org) or use --device cpu"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise SettingsError(
                f"device {device} asked for, but no CUDA GPU is visible "
                "(driver, CUDA_VISIBLE_DEVICES?): use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise SettingsError(f"device {device} does not exist: this machine has {count} GPU(s), cuda:0..{count - 1}")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingsError(f"device {device} asked for, but MPS is not available on this machine: use --device cpu")
    return device


def load_placed(
    folder: Path,
    config: CogVLMConfig,
    dtype: torch.dtype,
    device: str | torch.device | None = None,
    *,
    device_map: str | DeviceMap | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | Path | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
    progress: bool = False,
    model_class: type[nn.Module] = CogVLMForCausalLM,
) -> nn.Module:
    """Build `model_class` on the meta device and fill it from `folder`'s memory-mapped files,
    placed by `device_map` (None: everything on `device`); with `quantize`, each layer is
    quantised as its weight arrives; a saved quantised checkpoint loads as it was saved.
    Quantised layers cannot be offloaded (their kernels run where they live); the rest can."""
    saved = read_quantization(folder)
    if saved is not None and quantize not in (None, saved["method"]):
        raise SettingsError(
            f"{folder} is quantised with {saved['method']}, not {quantize}: "
            f"drop --quantize or load the full-precision folder"
        )
    if saved is not None:
        quantize, quantize_vision = saved["method"], saved["quantize_vision"]
    quantize = quantize and check_method(quantize)
    files = weight_files(folder)
    model = on_meta(model_class, config)
    if device_map is None:
        device_map = {"": str(check_device(device or "cpu"))}
    elif isinstance(device_map, str):
        device_map = plan_device_map(model, device_map, max_memory, dtype, quantize, quantize_vision)
    check_device_map(model, device_map)
    main = main_device(device_map)
    offloaded = {"disk"} if main == "cpu" else {"cpu", "disk"}
    if quantize is not None:  # their kernels run where they live: quantised layers stay put
        stranded = {
            key
            for name, module in model.named_modules()
            if is_target(name, module, quantize_vision)
            and device_map[key := _entry(device_map, f"{name}.weight")] in offloaded
        }
        if stranded:
            raise SettingsError(
                f"{quantize} layers cannot be offloaded ({_compress(sorted(stranded))} on "
                f"{'/'.join(sorted(offloaded))}): give the GPUs more max_memory or use a smaller quantisation"
            )
    buffers = {name for name, _ in model.named_buffers()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def place(path: Path, name: str) -> torch.device:
        value = device_map[_entry(device_map, name)]
        if value != "disk":
            return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
        # Disk: keep nothing from safetensors (accelerate reads the file itself); buffers and .bin
        # tensors come to the CPU (buffers are placed by the hooks, .bin is copied to the folder).
        return torch.device("cpu" if name in buffers or path.suffix != ".safetensors" else "meta")

    expected = {k: v.shape for k, v in model.state_dict().items()}
    found: dict[str, torch.Size] = {}
    index: dict[str, dict[str, str]] = {}  # disk-offloaded weights, for accelerate
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    if saved is not None:
        stream = ((files[0], n, t) for n, t in iter_quantized_checkpoint(files, partial(place, files[0]), dtype))
    else:  # pread when quantising: a full-precision tensor is freed once quantised
        stream = ((p, n, t) for p in files for n, t in iter_tensors(p, partial(place, p), dtype, mmap=quantize is None))
    try:
        for path, name, tensor in stream:
            bar.update()
            found[name] = tensor.shape
            if expected.get(name) != tensor.shape:
                continue  # reported with every other mismatch by check_keys below
            if device_map[_entry(device_map, name)] == "disk" and name not in buffers:
                index.update(_offload(path, name, tensor, dtype, offload_folder))
                continue
            module_name, module = _assign(model, name, tensor, name in trainable and not quantize)
            if quantize and not saved and name.endswith(".weight") and is_target(module_name, module, quantize_vision):
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, quantize_module(module, quantize))
                release_freed_memory()
    except torch.OutOfMemoryError:
        raise SettingsError(_out_of_memory(model, config, dtype, device_map, quantize, quantize_vision)) from None
    finally:
        bar.close()
    check_keys(expected, found, f"{folder} ({len(files)} weight file{'s' * (len(files) > 1)})")
    for name in expected.keys() - found.keys():  # inv_freq, computed as the official init would
        inv_freq = rotary_inv_freq(config.head_dim, dtype, config.rope_theta)
        _assign(model, name, inv_freq.to(place(files[0], name)), False)
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        from accelerate import dispatch_model

        dispatch_model(model, device_map, main_device=main, offload_dir=offload_folder, offload_index=index or None)
    if set(device_map) != {""}:  # as transformers: only a mapped model has one (peft reads it)
        model.hf_device_map = dict(device_map)
    return model.eval()


def _out_of_memory(
    model: nn.Module,
    config: CogVLMConfig,
    dtype: torch.dtype,
    device_map: DeviceMap,
    quantize: str | None,
    quantize_vision: bool,
) -> str:
    """What ran out, what the weights need, and the setting `choose_setting` finds for what is free."""
    need = weight_bytes(model, torch.finfo(dtype).bits // 8, quantize, quantize_vision)
    where = ", ".join(sorted({str(v) for v in device_map.values()}))
    _, advice = choose_setting(config, free_memory(), dtype)
    return (
        f"out of memory loading the weights on {where}: they need {need / 2**30:.2f} GiB "
        f"({str(dtype).replace('torch.', '')}{', ' + quantize if quantize else ''}); for the memory free now: "
        f"{advice} (pass that as --quantize / --device-map / --max-memory, or use --device auto)"
    )


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> tuple[str, nn.Module]:
    """Put a tensor in place of the meta one (parameters keep whether they train; quantised ones never)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)
    return module_name, module


def _offload(
    path: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype, offload_folder: str | Path | None
) -> dict[str, dict[str, Any]]:
    """Where accelerate finds a disk-offloaded tensor: its safetensors file, or a copy in the folder."""
    if tensor.device.type == "meta":
        stored = str(dtype if tensor.is_floating_point() else tensor.dtype).replace("torch.", "")
        return {name: {"safetensors_file": str(path), "weight_name": name, "dtype": stored}}
    if offload_folder is None:
        raise SettingsError(f"{path.name} is not safetensors: disk offload needs an offload_folder")
    from accelerate.utils import offload_weight

    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    return offload_weight(tensor, name, str(offload_folder), {})


# ---- the plan, printed -------------------------------------------------------------------------


def _compress(names: Sequence[str]) -> str:
    """'model.layers.0', ..., 'model.layers.15' -> 'model.layers.0-15'."""
    groups: list[list[Any]] = []  # [name] or [prefix, first, last]
    for name in names:
        m = re.fullmatch(r"(.+)\.(\d+)", name)
        last = groups[-1] if groups else None
        if m and last and len(last) == 3 and last[0] == m[1] and last[2] + 1 == int(m[2]):
            last[2] += 1
        else:
            groups.append([m[1], int(m[2]), int(m[2])] if m else [name])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}.{g[1]}" + (f"-{g[2]}" if g[2] > g[1] else "") for g in groups)


def describe_plan(
    folder_or_preset: str | Path,
    device_map: str | DeviceMap = "auto",
    max_memory: dict[Any, Any] | None = None,
    dtype: torch.dtype | str = "bfloat16",
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> str:
    """What `cogvlm info --device-map` prints: the modules and weight memory of each device,
    planned on the meta device (no weights read)."""
    from accelerate.utils import compute_module_sizes

    from . import resolve_config
    from .files import resolve_dtype

    config, source = resolve_config(folder_or_preset)
    dtype = resolve_dtype(dtype, config)
    model = on_meta(CogVLMForCausalLM, config)
    plan = (
        plan_device_map(model, device_map, max_memory, dtype, quantize, quantize_vision)
        if isinstance(device_map, str)
        else dict(device_map)
    )
    special = quantized_dtypes(model, quantize, quantize_vision)
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    budgets = _budgets(max_memory)
    per_device: dict[Any, list[str]] = {}
    for name, where in plan.items():
        per_device.setdefault(where, []).append(name)
    weights = str(dtype).replace("torch.", "") + (
        f", {quantize}{' (vision too)' * quantize_vision}" if quantize else ""
    )
    unit, scale = ("GiB", 2**30) if sizes[""] >= 2**30 else ("MiB", 2**20)
    lines = [
        f"device map '{device_map if isinstance(device_map, str) else 'given'}' for {source} ({weights}): "
        "planned on the meta device, nothing loaded",
        f"  {'device':<7} {'weights ' + unit:>12} {'budget ' + unit:>11}  modules",
    ]
    for where, names in per_device.items():
        budget = f"{budgets[where] / scale:11.2f}" if where in budgets else f"{'-':>11}"
        used = sum(sizes[n] for n in names) / scale
        lines.append(f"  {str(where):<7} {used:12.2f} {budget}  {_compress(names) or 'everything'}")
    main = main_device(plan)
    offloaded = " and ".join(str(d) for d in per_device if d == "disk" or (d == "cpu" and main != "cpu"))
    lines.append(
        f"  total   {sizes[''] / scale:12.2f} {unit}; "
        + (
            f"offloaded to {offloaded}: those weights travel to device {main} at every call (slow)"
            if offloaded
            else "no offload"
        )
        + f"; {', '.join(NO_SPLIT[:2])} kept whole"
    )
    if quantize and offloaded:
        lines.append(f"  (loading refuses this plan: {quantize} layers are never offloaded; raise --max-memory)")
    return "\n".join(lines)


# ---- choosing a setting for the memory there is ----------------------------------------------


def _setting(
    device: str,
    device_map: str | None = None,
    max_memory: dict[int | str, int] | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> dict[str, Any]:
    return {
        "device": device,
        "device_map": device_map,
        "max_memory": max_memory,
        "quantize": quantize,
        "quantize_vision": quantize_vision,
    }


def choose_setting(
    config: CogVLMConfig,
    free_bytes_per_device: dict[int | str, int],
    dtype: torch.dtype = torch.bfloat16,
    saved: str | None = None,
) -> tuple[dict[str, Any], str]:
    """The largest setting that fits the GPUs' free memory ({0: bytes, 1: ..., 'cpu': bytes}):
    `dtype` on one GPU, then a device map over all GPUs, then int8, then 4-bit (int4 on bf16
    GPUs, nf4 on fp16 ones, where tinygemm does not run), then 4-bit with the vision tower too;
    CPU offload or the CPU as a last resort. A folder already quantised (`saved`, its method) is
    only ever placed, never quantised another way. Each GPU keeps 10% and the KV cache of a full
    context free. Returns `load_model` keyword arguments and a sentence saying what and why."""
    gpus = sorted(k for k in free_bytes_per_device if isinstance(k, int))
    if not gpus:
        return _setting("cpu"), "no GPU: running on the CPU"
    model = on_meta(CogVLMForCausalLM, config)
    size = torch.finfo(dtype).bits // 8
    kv = 2 * config.num_hidden_layers * config.max_position_embeddings * config.hidden_size * size
    budgets = {g: int(free_bytes_per_device[g] * GPU_SHARE) - kv // len(gpus) for g in gpus}
    name = str(dtype).replace("torch.", "")
    four = "int4" if dtype == torch.bfloat16 else "nf4"
    choices = ((None, False), ("int8", False), (four, False), (four, True)) if saved is None else ((saved, False),)
    full = weight_bytes(model, size, saved)
    label = f"{name}{f' ({saved}, as saved)' if saved else ''} weights ({full / 2**30:.1f} GiB)"
    first = f"GPU {gpus[0]} ({free_bytes_per_device[gpus[0]] / 2**30:.1f} GiB free)"
    for quantize, vision in choices:
        need = weight_bytes(model, size, quantize, vision)
        what = f"{quantize or name}{' with the vision tower' if vision else ''} ({need / 2**30:.1f} GiB)"
        if need + kv <= free_bytes_per_device[gpus[0]] * GPU_SHARE:
            setting, where = _setting(f"cuda:{gpus[0]}", None, None, quantize, vision), first
        elif len(gpus) > 1 and not {"cpu", "disk"} & set(
            plan_device_map(model, "auto", budgets, dtype, quantize, vision).values()
        ):
            setting, where = _setting("cuda", "auto", budgets, quantize, vision), f"{len(gpus)} GPUs"
        else:
            continue
        fits = quantize == saved and setting["device_map"] is None
        return setting, f"{label} " + (f"fit {first}" if fits else f"do not fit {first}: using {what} on {where}")
    cpu = int(free_bytes_per_device.get("cpu", 0) * GPU_SHARE)
    if saved is None and full <= sum(budgets.values()) + cpu:
        return (
            _setting("cuda", "auto", {**budgets, "cpu": cpu}),
            f"even 4-bit weights do not fit the GPUs: {name} with CPU offload (slow)",
        )
    return _setting("cpu", quantize=saved), f"{label} fit neither the GPUs nor CPU offload: running on the CPU"


def free_memory() -> dict[int | str, int]:
    """Free bytes on each visible GPU and available RAM ('cpu')."""
    import psutil

    return {
        **{i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())},
        "cpu": psutil.virtual_memory().available,
    }


def read_device_map(text: str | DeviceMap | None) -> str | DeviceMap | None:
    """A strategy name, or a map from a JSON object or a JSON file (a dict is taken as it is)."""
    if text is None or isinstance(text, dict) or text in STRATEGIES:
        return text
    try:
        data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except (json.JSONDecodeError, OSError):
        data = None
    if not isinstance(data, dict):
        raise SettingsError(f"--device-map: '{text}' is neither {', '.join(STRATEGIES)} nor a JSON map")
    return data


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its weight's, or, when accelerate offloaded the weight
    (left on 'meta'), the execution device of the hook that brings it back for each call."""
    weight = next(module.parameters())
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # one hook, or accelerate's SequentialHook
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    raise RuntimeError(f"{type(module).__name__} is on the meta device and has no execution device")
