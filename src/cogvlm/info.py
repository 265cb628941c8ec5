"""Architecture summary of a folder or preset, built on the meta device (no weights read)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CogVLMConfig
from .loading import resolve_config
from .model import CogVLMForCausalLM

#: Bytes per parameter for weight memory estimates (int4 packs two weights per byte).
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def parameter_counts(config: CogVLMConfig) -> dict[str, int]:
    """Parameters per part: vision tower (CogVLM2's conv included), adapter (GLU + boi/eoi), language
    expert, vision experts. Buffers (the rotary `inv_freq`, which checkpoints may store) are not counted."""
    with torch.device("meta"):
        model = CogVLMForCausalLM(config)
    counts = {"vision tower (EVA2-CLIP)": 0, "adapter (GLU, boi, eoi)": 0, "language model": 0, "visual experts": 0}
    for name, p in model.named_parameters():
        if name.startswith(("model.vision.transformer", "model.vision.patch_embedding", "model.vision.conv")):
            counts["vision tower (EVA2-CLIP)"] += p.numel()
        elif name.startswith("model.vision."):
            counts["adapter (GLU, boi, eoi)"] += p.numel()
        elif "vision_expert" in name or "vision_mlp" in name:
            counts["visual experts"] += p.numel()
        else:
            counts["language model"] += p.numel()
    return counts


def describe(folder_or_preset: str | Path) -> str:
    """The text `cogvlm info` prints."""
    config, source = resolve_config(folder_or_preset)
    v = config.vision_config
    counts = parameter_counts(config)
    total = sum(counts.values())
    heads = f"{config.num_attention_heads} heads"
    if config.num_kv_heads != config.num_attention_heads:
        heads += f" ({config.num_kv_heads} key/value)"
    side = v.image_size // v.patch_size
    conv = f", stride-2 conv to {config.image_grid}x{config.image_grid}" if config.vision_conv else ""
    lines = [
        f"{config.family} ({source})",
        f"  decoder: {config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"{heads} x {config.head_dim}, FFN {config.intermediate_size}, "
        f"vocab {config.vocab_size}, visual expert in every layer",
        f"  vision:  EVA2-CLIP {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_heads} heads, "
        f"FFN {v.intermediate_size}, {v.image_size} px / patch {v.patch_size} = {side}x{side} patches{conv}",
        f"  image tokens per image: {config.image_tokens} (grid + boi + eoi); template: {config.template_version}",
        "  parameters:",
        *(f"    {name:<26} {n / 1e9:8.3f} B" for name, n in counts.items()),
        f"    {'total':<26} {total / 1e9:8.3f} B ({total:,})",
        "  weight memory:",
        *(f"    {dtype:<6} {total * b / 2**30:8.2f} GiB" for dtype, b in BYTES_PER_PARAM.items()),
    ]
    return "\n".join(lines)
