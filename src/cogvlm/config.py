"""Frozen configs read from and written to the official `config.json`, plus named presets.

The official `CogVLMConfig` keeps `vision_config` as a plain dict; here both halves are frozen
dataclasses. Unknown fields in a config.json are ignored; missing architecture fields are an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP vision tower (`vision_config` in config.json)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_heads: int
    num_hidden_layers: int
    intermediate_size: int
    num_positions: int
    in_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    dropout_prob: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CogVLMConfig:
    """The whole model: LLaMA decoder with visual experts plus `vision` (config.json fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vision_config: VisionConfig
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    template_version: str = "chat"
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False
    use_cache: bool = True
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the prompt: patches + boi + eoi (1227 at 490 px)."""
        return self.vision_config.num_patches + 2

    # ---- config.json -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> "CogVLMConfig":
        """Build from the official dict; ignores unknown keys, names missing required ones."""
        vision = data.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{source}: missing required field 'vision_config'")
        vcfg = _build(VisionConfig, vision, f"{source}: vision_config")
        top = {k: v for k, v in data.items() if k != "vision_config"}
        if isinstance(top.get("eos_token_id"), list):  # CogVLM2 style list; the first ends turns
            top["eos_token_id"] = top["eos_token_id"][0]
        return _build(cls, {**top, "vision_config": vcfg}, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "CogVLMConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in this folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official config.json content (with architectures and auto_map)."""
        out: dict[str, Any] = {
            "architectures": ["CogVLMForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_cogvlm.CogVLMConfig",
                "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
            },
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dataclasses.asdict(value) if f.name == "vision_config" else value
        out["transformers_version"] = "4.35.0"
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> "CogVLMConfig":
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: dict[str, Any], source: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in names.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    return cls(**{k: v for k, v in data.items() if k in names})


def _vision(image_size: int, width: int, layers: int, heads: int, ffn: int, patch: int = 14) -> VisionConfig:
    return VisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=width, num_heads=heads,
        num_hidden_layers=layers, intermediate_size=ffn,
        num_positions=(image_size // patch) ** 2 + 1,
    )


_EVA2_E_490 = _vision(490, 1792, 63, 16, 15360)
_LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32)

#: The released shapes, plus small ones for tests and benchmarks.
PRESETS: dict[str, CogVLMConfig] = {
    "cogvlm-chat-17b": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490, template_version="chat"),
    "cogvlm-base-490": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490, template_version="base"),
    "cogvlm-base-224": CogVLMConfig(**_LLAMA_7B, vision_config=_vision(224, 1792, 63, 16, 15360),
                                    template_version="base"),
    "cogvlm-grounding-generalist": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490,
                                                template_version="base"),
    # Same geometry as reference-tiny: 28 px, 2x2 patches, width 64.
    "tiny": CogVLMConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, vision_config=_vision(28, 32, 2, 4, 64),
                         torch_dtype="float32"),
    # The real image geometry (490 px, 1225 patches, 1227 image tokens) at laptop widths.
    "bench-490": CogVLMConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                              num_hidden_layers=8, num_attention_heads=8,
                              vision_config=_vision(490, 256, 4, 4, 1024), torch_dtype="float32"),
}


def get_preset(name: str) -> CogVLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


__all__ = ["VisionConfig", "CogVLMConfig", "PRESETS", "get_preset",
           "LANGUAGE_TOKEN_TYPE", "VISION_TOKEN_TYPE"]
