"""Architecture summary of a folder or preset, built on the meta device (no weights read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import CogVLMConfig
from .loading import resolve_config
from .model import CogVLMForCausalLM, on_meta

#: Bytes per parameter for weight memory estimates (int4 packs two weights per byte).
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def parameter_counts(config: CogVLMConfig) -> dict[str, int]:
    """Parameters per part: vision tower (CogVLM2's conv included), adapter (GLU + boi/eoi), language
    expert, vision experts. Buffers (the rotary `inv_freq`, which checkpoints may store) are not counted."""
    model = on_meta(CogVLMForCausalLM, config)
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


def _scaled(value: float, base: int, units: Sequence[str]) -> str:
    """`value` to three significant digits in the first of `units` (each `base` times the one before)
    that keeps it under `base` once rounded (999,999 reads 1.00 M, not 1000 K); unscaled values print whole."""
    if float(f"{value:.3g}") < base:
        return f"{value:.0f}{units[0]}"
    for unit in units[1:]:
        value /= base
        rounded = float(f"{value:.3g}")
        if rounded < base or unit == units[-1]:
            break
    return f"{rounded:.{max(0, 3 - len(str(int(rounded))))}f}{unit}"


def human_count(n: int) -> str:
    """A parameter count in the unit that suits it (840 K, 5.58 M, 17.6 B): small models read as such."""
    return _scaled(n, 1000, ("", " K", " M", " B", " T"))


def human_bytes(n: float) -> str:
    """A size in bytes in the binary unit that suits it (10.6 MiB, 32.9 GiB)."""
    return _scaled(n, 1024, (" B", " KiB", " MiB", " GiB", " TiB"))


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
        *(f"    {name:<26} {human_count(n):>8}" for name, n in counts.items()),
        f"    {'total':<26} {human_count(total):>8} ({total:,})",
        "  weight memory:",
        *(f"    {dtype:<6} {human_bytes(total * b):>10}" for dtype, b in BYTES_PER_PARAM.items()),
    ]
    return "\n".join(lines)
