"""What trains: weight init, the three training modes, LoRA through peft, and LoRA merging.

- from_scratch: everything trains (with a `model` folder this is a full fine-tune).
- expert: CogVLM's recipe. The language model is frozen (embed_tokens, language experts, norms,
  lm_head); the vision experts (CogVLM2's QKV bias included) start as copies of the language
  experts and train together with the adapter (linear_proj, boi, eoi, and CogVLM2's stride-2
  conv), plus the ViT with `train_vit`.
- lora: peft LoRA on `lora_targets` (default: the vision experts' QKV, dense and MLP); the base
  stays frozen. A LoRA checkpoint is a peft adapter folder whose `base_model_name_or_path` names
  the base checkpoint; `merge_lora` folds it into a plain official-layout checkpoint.

Parameter groups are named by glob patterns over the official names (`PARTS`), used both for
freezing here and for per-group learning rates in the loop.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..config import CogVLMConfig, get_preset
from ..dropin import CogVLMForCausalLM
from ..loading.files import resolve_dtype
from ..model.cogvlm import on_meta
from ..tokenizer import copy_tokenizer_files
from .config import TrainConfig, TrainError

#: The model's parameters in four disjoint parts, as glob patterns over official names.
PARTS: dict[str, tuple[str, ...]] = {
    "language": (
        "model.embed_tokens.*",
        "model.layers.*.language_expert_*",
        "model.layers.*.language_mlp.*",
        "model.layers.*layernorm.*",
        "model.norm.*",
        "lm_head.*",
    ),
    "vision_experts": ("model.layers.*.vision_expert_*", "model.layers.*.vision_mlp.*"),
    # CogVLM2's stride-2 conv is CogVLM2's own, between the pretrained EVA2-CLIP and the GLU: adapter.
    "adapter": ("model.vision.linear_proj.*", "model.vision.boi", "model.vision.eoi", "model.vision.conv.*"),
    "vit": ("model.vision.patch_embedding.*", "model.vision.transformer.*"),
}
_WRAPPER_PREFIXES = ("base_model.model.", "cogvlm.")  # peft's; the patches objective's


def official_name(name: str) -> str:
    """A parameter name without a training wrapper's prefix, so patterns match in every mode."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when `name` starts with, or globs to, a pattern; '@part' stands for PARTS[part]."""
    for pattern in patterns:
        if pattern.startswith("@"):
            if pattern[1:] not in PARTS:
                raise TrainError(f"unknown parameter group {pattern} (known: @{', @'.join(PARTS)})")
            if matches(name, PARTS[pattern[1:]]):
                return True
        elif name.startswith(pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


@torch.no_grad()
def copy_language_to_vision(model: CogVLMForCausalLM) -> None:
    """Start every vision expert as a copy of its layer's language expert (CogVLM's init), so that
    each computes what the language model computes. CogVLM2's vision QKV has a bias that its
    language QKV lacks: it starts at zero, the copy of no bias (it trains with the expert)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.vision_expert_query_key_value.weight.copy_(attn.language_expert_query_key_value.weight)
        if attn.vision_expert_query_key_value.bias is not None:
            attn.vision_expert_query_key_value.bias.zero_()
        attn.vision_expert_dense.weight.copy_(attn.language_expert_dense.weight)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp.vision_mlp, proj).weight.copy_(getattr(mlp.language_mlp, proj).weight)


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> None:
    """requires_grad on exactly the parameters whose official name matches a pattern."""
    patterns = tuple(patterns)
    for name, param in model.named_parameters():
        param.requires_grad_(matches(official_name(name), patterns))


def apply_mode(model: CogVLMForCausalLM, cfg: TrainConfig, base_path: Path | None = None) -> nn.Module:
    """The module to train for cfg.mode: the model itself, or (lora) a peft wrapper around it."""
    if cfg.mode == "from_scratch":
        model.requires_grad_(True)
        return model
    if cfg.mode == "expert":
        if cfg.copy_language_to_vision:
            copy_language_to_vision(model)
        set_trainable(model, ("@vision_experts", "@adapter") + (("@vit",) if cfg.train_vit else ()))
        return model
    return add_lora(model, cfg, base_path)


def add_lora(model: CogVLMForCausalLM, cfg: TrainConfig, base_path: Path | None) -> nn.Module:
    """Wrap in a peft LoRA model (works on any nn.Module; ours has no transformers config)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets)
    )
    try:
        wrapped = get_peft_model(model, lora)
    except ValueError as e:  # peft names the targets it could not find
        raise TrainError(f"lora_targets: {' '.join(str(e).split())[:200]}") from None
    if base_path is not None:  # peft would write None: our model has no `name_or_path`
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base_path).resolve())
    return wrapped


def is_lora(model: nn.Module) -> bool:
    """True for a peft wrapper (checked by attribute, so peft is imported only when used)."""
    return hasattr(model, "peft_config")


def save_weights(model: nn.Module, folder: Path, max_shard_size: str = "5GB") -> None:
    """The official layout (config.json + safetensors), or a peft adapter folder for LoRA."""
    if is_lora(model):
        model.save_pretrained(str(folder), save_embedding_layers=False)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)


def load_weights(model: nn.Module, folder: Path) -> None:
    """Inverse of `save_weights`, in place and exact, into a model built the same way."""
    from safetensors.torch import load_file

    from ..loading.files import weight_files

    if is_lora(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise TrainError(f"{folder}: adapter does not match this model ({result.unexpected_keys[:3]})")
        return
    state = {name: tensor for path in weight_files(folder) for name, tensor in load_file(path).items()}
    if hasattr(model, "load_pretrained"):  # the patches objective's CogVLM + head
        model.load_pretrained(folder, state)
    else:
        model.load_state_dict(state, strict=True)


def merge_lora(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA checkpoint into its base and write a plain official-layout checkpoint: config.json,
    generation_config.json and the remote-code files as the base has them, and the base's tokenizer
    files when it ships some (CogVLM2 does), so the folder loads on its own."""
    from peft import PeftConfig, PeftModel

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / "adapter_config.json").is_file():
        raise TrainError(f"{checkpoint_dir}: not a LoRA checkpoint (no adapter_config.json)")
    base_path = PeftConfig.from_pretrained(str(checkpoint_dir)).base_model_name_or_path
    if not base_path:
        raise TrainError(f"{checkpoint_dir}/adapter_config.json: no base_model_name_or_path")
    base = CogVLMForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, str(checkpoint_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    copy_tokenizer_files(base_path, out_dir)
    return out_dir


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(official name, parameter) of what the optimizer updates."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield official_name(name), param


def model_config_from(spec: Any) -> CogVLMConfig:
    """A preset name, or a dict of config fields with an optional 'preset' base to override."""
    if isinstance(spec, str):
        return get_preset(spec)
    if not isinstance(spec, dict):
        raise TrainError("model_config must be a preset name or a mapping of config fields")
    fields = dict(spec)
    preset = fields.pop("preset", None)
    if preset is None:
        return CogVLMConfig.from_dict(fields, "model_config")
    base = get_preset(preset)
    try:
        if "vision_config" in fields:
            fields["vision_config"] = dataclasses.replace(base.vision_config, **fields["vision_config"])
        config = base.replace(**fields)
    except TypeError as e:
        raise TrainError(f"model_config: {e}") from None
    CogVLMConfig.from_dict(config.to_dict(), "model_config")  # the checks a config.json gets (activations, head counts)
    return config


def _matching(model: nn.Module, patterns: list[str], setting: str) -> list[nn.Parameter]:
    """The parameters a setting's patterns name; a setting that names none is an error."""
    found = [param for name, param in model.named_parameters() if matches(name, patterns)]
    if not found:
        raise TrainError(f"{setting}: no parameter matches")
    return found


def resize_images(model: CogVLMForCausalLM, image_size: int) -> CogVLMForCausalLM:
    """The model at another input size: the ViT's position embeddings interpolated bicubically
    over the patch grid (cls kept), as CogVLM went from 224 to 490 px; every other weight as is."""
    vision = model.config.vision_config
    if image_size % vision.patch_size:
        raise TrainError(f"image_size {image_size} is not a multiple of the patch size {vision.patch_size}")
    old, new = vision.image_size // vision.patch_size, image_size // vision.patch_size
    config = model.config.replace(
        vision_config=dataclasses.replace(vision, image_size=image_size, num_positions=new * new + 1)
    )
    state = model.state_dict()
    key = "model.vision.patch_embedding.position_embedding.weight"
    pos = state[key]  # (1 + old*old, Dv)
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, Dv, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    state[key] = torch.cat((pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos.dtype)))
    resized = on_meta(CogVLMForCausalLM, config)
    resized.load_state_dict(state, assign=True)
    return resized


def deepen_vision(model: CogVLMForCausalLM, layers: int) -> CogVLMForCausalLM:
    """The model with its ViT grown to `layers`: the trained layers first, then new ones from the
    from-scratch init whose two sublayer norms (weight and bias) are zero, so each new layer is the
    identity (x + LN(f(x)) = x) until it trains; every other weight as is."""
    vision = model.config.vision_config
    if layers < vision.num_hidden_layers:
        raise TrainError(f"vision_layers {layers} is fewer than the model's {vision.num_hidden_layers} ViT layers")
    config = model.config.replace(vision_config=dataclasses.replace(vision, num_hidden_layers=layers))
    deeper = CogVLMForCausalLM(config).to(model.dtype)
    new = [f"model.vision.transformer.layers.{i}." for i in range(vision.num_hidden_layers, layers)]
    deeper.init_weights(only=lambda name: name.startswith(tuple(new)))
    loaded = deeper.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(k.startswith(tuple(new)) for k in loaded.missing_keys)
    with torch.no_grad():
        for layer in deeper.model.vision.transformer.layers[vision.num_hidden_layers :]:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.zero_()
                norm.bias.zero_()
    return deeper


def build_model(cfg: TrainConfig, accelerator: Accelerator, output_dir: Path) -> tuple[nn.Module, CogVLMConfig]:
    """The module to train (mode applied) and its model config; seeded init when from scratch."""
    base_path = Path(cfg.model) if cfg.model else output_dir / "base"
    if cfg.model or (cfg.mode == "lora" and (base_path / "config.json").is_file()):
        model = CogVLMForCausalLM.from_pretrained(base_path, torch_dtype=cfg.model_dtype)
    else:
        model = CogVLMForCausalLM(model_config_from(cfg.model_config))
        model.init_weights().to(resolve_dtype(cfg.model_dtype))
        if cfg.mode == "lora":  # the adapter needs its base on disk to be merged later
            if accelerator.is_main_process:
                model.save_pretrained(base_path)
            accelerator.wait_for_everyone()
    if cfg.image_size is not None and cfg.image_size != model.config.vision_config.image_size:
        model = resize_images(model, cfg.image_size)
    if cfg.vision_layers is not None and cfg.vision_layers != model.config.vision_config.num_hidden_layers:
        model = deepen_vision(model, cfg.vision_layers)
    if cfg.reinit:
        _matching(model, cfg.reinit, f"reinit {cfg.reinit}")
        model.init_weights(only=lambda name: matches(name, cfg.reinit))
    with torch.no_grad():
        for pattern, factor in cfg.rescale.items():
            for param in _matching(model, [pattern], f"rescale {pattern!r}"):
                param.mul_(factor)
    model.model.gradient_checkpointing = cfg.gradient_checkpointing
    return apply_mode(model.train(), cfg, base_path), model.config


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: lr from the first matching `lr_groups` entry; no decay on vectors. A part
    given lr 0 is frozen (requires_grad off, so no gradient is computed for it)."""
    rules = []
    for group in cfg.lr_groups:
        if not isinstance(group, dict) or "params" not in group or "lr" not in group:
            raise TrainError(f"lr_groups entry {group!r}: needs 'params' (patterns) and 'lr'")
        patterns = [group["params"]] if isinstance(group["params"], str) else list(group["params"])
        rules.append((patterns, float(group["lr"])))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in trainable_parameters(model):
        lr = next((lr for patterns, lr in rules if matches(name, patterns)), cfg.lr)
        if lr == 0:
            param.requires_grad_(False)
            continue
        decay = cfg.weight_decay if param.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(param)
    if not groups:
        raise TrainError(f"mode {cfg.mode}: no parameter is trainable")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


__all__ = [
    "PARTS",
    "copy_language_to_vision",
    "apply_mode",
    "merge_lora",
    "matches",
    "official_name",
    "save_weights",
    "load_weights",
    "trainable_parameters",
    "set_trainable",
    "model_config_from",
    "build_model",
    "param_groups",
]
