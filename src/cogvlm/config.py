"""Frozen configs read from and written to the official `config.json`, plus named presets.

The official `CogVLMConfig` keeps `vision_config` as a plain dict; here both halves are frozen
dataclasses. Missing architecture fields are an error; unknown fields are ignored unless they
would change the computation.

Two families share this one config and one network. CogVLM2 (cogvlm2-llama3-*) is CogVLM on
Llama-3 with grouped-query attention, a bias on the vision expert's QKV, a stride-2 conv after
the ViT and RoPE base 500000. Its official code hard-codes most of that, so its config.json does
not say it; the family is recognised by a rule chosen here: **a config.json whose `bos_token_id`
is 128000 (Llama-3's `<|begin_of_text|>`) is CogVLM2**, every other one CogVLM-1. The rule then
fills the fields its code hard-codes (`_COGVLM2_CODE`) when config.json does not set them, and
`to_dict` leaves out what equals the family's values, so both families' config.json files are
written back as they were read. The model reads the fields, never the family.

What each field that could change the forward gets here:

- Honoured: every shape field; `num_multi_query_heads` (CogVLM2's key/value heads, 8 when
  absent as in the released config.json); `rms_norm_eps`; `hidden_act` and
  `vision_config.hidden_act` (through `ACTIVATIONS`); `rope_theta` (absent from both families'
  configs, whose code hard-codes 10000 and 500000); `vision_config.layer_norm_eps`,
  `in_channels`, `dropout_prob` (training only); `initializer_range` (random init);
  `pad_token_id` (the embedding's padding row); `torch_dtype` (the loaders' "auto" dtype).
- Not part of the forward: `max_position_embeddings` (the official code never reads it; here it
  is `context_length`), `template_version` (prompts), bos/eos ids (generation; `eos_token_id`
  may be a list, generation stops at any of them), `use_cache`.
- Refused with one line, at parse time: an unknown activation name, `tie_word_embeddings` true,
  `rope_scaling` not null, `pretraining_tp` not 1, `attention_bias`/`mlp_bias` true,
  `num_multi_query_heads` in a CogVLM-1 config other than the heads, in a CogVLM2 one not a
  divisor of them, `num_key_value_heads`/`head_dim` that disagree with the heads, a width not
  divisible by the heads, a non-positive `rope_theta`, and `vision_config.num_positions` other
  than patches + 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))).tanh())


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + (x * 0.7978845608 * (1.0 + 0.044715 * x * x)).tanh())


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * (1.702 * x).sigmoid()


def _functional(name: str, **kwargs: Any) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
    """`torch.nn.functional.<name>` (with `kwargs` bound), looked up when the model asks for it."""

    def resolve() -> Callable[[torch.Tensor], torch.Tensor]:
        import torch.nn.functional as F

        return partial(getattr(F, name), **kwargs) if kwargs else getattr(F, name)

    return resolve


class _Activations(Mapping[str, Callable[["torch.Tensor"], "torch.Tensor"]]):
    """Name -> activation; torch is imported at the first lookup, so reading a config (and the
    CLI's argument checks) need no torch."""

    def __init__(self, resolvers: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]]) -> None:
        self._resolvers = resolvers

    def __getitem__(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._resolvers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolvers)

    def __len__(self) -> int:
        return len(self._resolvers)


#: `hidden_act` names, meaning what the same names mean in transformers' ACT2FN (the formulas
#: of the tanh approximations included, so a converted checkpoint computes the same numbers).
ACTIVATIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = _Activations(
    {
        "silu": _functional("silu"),
        "swish": _functional("silu"),
        "gelu": _functional("gelu"),  # exact (erf)
        "gelu_pytorch_tanh": _functional("gelu", approximate="tanh"),
        "gelu_new": lambda: _gelu_new,
        "gelu_fast": lambda: _gelu_fast,
        "quick_gelu": lambda: _quick_gelu,
        "relu": _functional("relu"),
    }
)


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
    hidden_act: str = "gelu"  # the ViT MLP's activation, a key of ACTIVATIONS
    layer_norm_eps: float = 1e-6
    dropout_prob: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CogVLMConfig:
    """The whole model: LLaMA decoder with visual experts plus `vision` (config.json fields).

    The defaults are CogVLM-1's; the last five fields are those CogVLM2's code assumes (`_COGVLM2_CODE`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vision_config: VisionConfig
    hidden_act: str = "silu"  # the decoder MLP's gate activation
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    template_version: str = "chat"
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)  # config.json's eos_token_id: one id, or a list (CogVLM2)
    tie_word_embeddings: bool = False
    use_cache: bool = True
    torch_dtype: str = "bfloat16"
    num_multi_query_heads: int | None = None  # key/value heads (CogVLM2's GQA); None: one per query head
    rope_theta: float = 10000.0  # RoPE base; not in config.json (see module doc)
    vision_expert_qkv_bias: bool = False  # CogVLM2: the vision expert's QKV has a bias
    vision_conv: bool = False  # CogVLM2: Conv2d(Dv, Dv, 2, stride 2) on the patch grid (`model.vision.conv`)
    image_token_id: int | None = None  # image placeholder id; None: the tokenizer's pad id (CogVLM-1)

    @property
    def family(self) -> str:
        """'CogVLM2' or 'CogVLM' by the rule in the module docstring (names and config.json only)."""
        return "CogVLM2" if self.bos_token_id == LLAMA3_BOS_TOKEN_ID else "CogVLM"

    @property
    def eos_token_id(self) -> int:
        """The first eos id (the one that ends a text); generation stops at any of `eos_token_ids`."""
        return self.eos_token_ids[0]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: query head j reads KV head j // (heads / kv_heads)."""
        return self.num_multi_query_heads or self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Most tokens one sequence may hold, prompt (image tokens included) plus generated ones.

        This is `max_position_embeddings`: the official code stores it but never reads it. It is
        2048 in every published CogVLM-1 config (where the demos stop at max_length=2048) and 8192
        in CogVLM2's.
        """
        return self.max_position_embeddings

    @property
    def image_grid(self) -> int:
        """Side of the grid of image tokens: patches per side, halved by the stride-2 conv."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side // 2 if self.vision_conv else side

    @property
    def image_tokens(self) -> int:
        """Tokens one image takes in the prompt: grid + boi + eoi (1227 at 490 px; 2306 for CogVLM2's 1344 px)."""
        return self.image_grid**2 + 2

    # ---- config.json -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> CogVLMConfig:
        """Build from the official dict; names missing required keys and refuses values the
        model cannot compute with (see the module docstring); ignores other unknown keys."""
        vision = data.get("vision_config")
        if not isinstance(vision, dict):
            raise CheckpointError(f"{source}: missing required field 'vision_config'")
        vcfg = _build(VisionConfig, vision, f"{source}: vision_config")
        _check_vision(vcfg, source)
        top = {**_family_code(data.get("bos_token_id")), **{k: v for k, v in data.items() if k != "vision_config"}}
        eos = top.pop("eos_token_id", None)
        if eos is not None:
            top["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
        config = _build(cls, {**top, "vision_config": vcfg}, source)
        _check_decoder(config, data, source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> CogVLMConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in this folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The official config.json content of this family (with architectures and auto_map)."""
        code = _family_code(self.bos_token_id)
        cogvlm2 = self.family == "CogVLM2"
        out: dict[str, Any] = {
            "architectures": ["CogVLMForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_cogvlm.CogVLMConfig",
                "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
            },
            "eos_token_id": list(self.eos_token_ids) if cogvlm2 or len(self.eos_token_ids) > 1 else self.eos_token_id,
            "transformers_version": "4.43.4" if cogvlm2 else "4.35.0",
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "eos_token_ids" or (f.name in code and value == code[f.name]):
                continue  # what the family's code assumes stays out, so config.json is written back as read
            out[f.name] = dataclasses.asdict(value) if f.name == "vision_config" else value
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> CogVLMConfig:
        return dataclasses.replace(self, **changes)


#: Llama-3's `<|begin_of_text|>`: the bos id that marks a CogVLM2 config.json (the module's rule).
LLAMA3_BOS_TOKEN_ID = 128000

#: What the official CogVLM2 code assumes that its config.json does not say (the configuration
#: class defaults `num_multi_query_heads` to 8; the modeling code hard-codes the rest).
_COGVLM2_CODE: dict[str, Any] = {
    "num_multi_query_heads": 8,
    "rope_theta": 500000.0,
    "vision_expert_qkv_bias": True,
    "vision_conv": True,
    "image_token_id": 128002,
}


def _family_code(bos_token_id: Any) -> dict[str, Any]:
    """The values of `_COGVLM2_CODE`'s fields that the family's official code assumes."""
    if bos_token_id == LLAMA3_BOS_TOKEN_ID:
        return _COGVLM2_CODE
    return {f.name: f.default for f in dataclasses.fields(CogVLMConfig) if f.name in _COGVLM2_CODE}


def _refuse(source: str, field: str, value: Any, supported: str) -> CheckpointError:
    shown = json.dumps(value, default=str)  # as written in config.json: true, null, "gelu"
    return CheckpointError(f"{source}: {field} {shown} is not supported ({supported})")


def _check_activation(name: Any, source: str, field: str) -> None:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise _refuse(source, field, name, f"known: {', '.join(ACTIVATIONS)}")


def _check_vision(v: VisionConfig, source: str) -> None:
    _check_activation(v.hidden_act, source, "vision_config.hidden_act")
    if v.hidden_size % v.num_heads:
        raise _refuse(
            source,
            "vision_config.hidden_size",
            v.hidden_size,
            f"must be a multiple of vision_config.num_heads {v.num_heads}",
        )
    if v.num_positions != v.num_patches + 1:
        raise _refuse(
            source,
            "vision_config.num_positions",
            v.num_positions,
            f"must be (image_size // patch_size)^2 + 1 = {v.num_patches + 1}",
        )


def _fixed(c: CogVLMConfig) -> dict[str, tuple[Any, str]]:
    """Keys (mostly LLaMA-style ones the official code never reads) with the one value our forward
    computes with, and why."""
    cogvlm2 = c.family == "CogVLM2"
    kv_why = (
        "the key/value heads are num_multi_query_heads"
        if cogvlm2
        else f"grouped-query attention is CogVLM2's (config.json bos_token_id {LLAMA3_BOS_TOKEN_ID})"
    )
    fixed = {
        "tie_word_embeddings": (False, "lm_head and embed_tokens are separate weights"),
        "rope_scaling": (None, "RoPE is unscaled"),
        "pretraining_tp": (1, "linear layers are not sliced"),
        "attention_bias": (False, "the language expert's projections have no bias"),
        "mlp_bias": (False, "the MLP projections have no bias"),
        "num_key_value_heads": (c.num_kv_heads, kv_why),
        "head_dim": (c.head_dim, "the head width is hidden_size / num_attention_heads"),
    }
    if not cogvlm2:  # CogVLM-1's code has no such key: a different value would be ignored there
        fixed["num_multi_query_heads"] = (c.num_attention_heads, kv_why)
    return fixed


def _check_decoder(c: CogVLMConfig, data: dict[str, Any], source: str) -> None:
    _check_activation(c.hidden_act, source, "hidden_act")
    heads = c.num_attention_heads
    if c.hidden_size % heads:
        raise _refuse(source, "hidden_size", c.hidden_size, f"must be a multiple of num_attention_heads {heads}")
    kv = c.num_multi_query_heads
    if c.family == "CogVLM2" and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or heads % kv):
        raise _refuse(source, "num_multi_query_heads", kv, f"must divide num_attention_heads {heads}")
    for key, (value, why) in _fixed(c).items():
        if data.get(key, value) != value:
            raise _refuse(source, key, data[key], f"only {json.dumps(value)}: {why}")
    theta = c.rope_theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise _refuse(source, "rope_theta", theta, "only a positive number")


def _build(cls: type, data: dict[str, Any], source: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in names.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    return cls(**{k: v for k, v in data.items() if k in names})


def _vision(image_size: int, width: int, layers: int, heads: int, ffn: int, patch: int = 14) -> VisionConfig:
    return VisionConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=width,
        num_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_positions=(image_size // patch) ** 2 + 1,
    )


_EVA2_E_490 = _vision(490, 1792, 63, 16, 15360)
_LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
}
#: Llama-3's vocabulary, special ids and context, as CogVLM2's config.json gives them.
_LLAMA3 = {
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "bos_token_id": LLAMA3_BOS_TOKEN_ID,
    "eos_token_ids": (128001, 128009),  # <|end_of_text|>, <|eot_id|>
    "pad_token_id": 128002,  # <|reserved_special_token_0|>, also the image placeholder
}


def _cogvlm2(**fields: Any) -> CogVLMConfig:
    """A CogVLM2 shape: Llama-3's ids and context, what CogVLM2's code hard-codes, then `fields`."""
    return CogVLMConfig(**{**_LLAMA3, **_COGVLM2_CODE, **fields})


_COGVLM2_19B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vision_config": _vision(1344, 1792, 63, 16, 15360),
}

#: The released shapes, plus small ones for tests and benchmarks.
PRESETS: dict[str, CogVLMConfig] = {
    "cogvlm-chat-17b": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490, template_version="chat"),
    "cogvlm-base-490": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490, template_version="base"),
    "cogvlm-base-224": CogVLMConfig(
        **_LLAMA_7B, vision_config=_vision(224, 1792, 63, 16, 15360), template_version="base"
    ),
    "cogvlm-grounding-generalist": CogVLMConfig(**_LLAMA_7B, vision_config=_EVA2_E_490, template_version="base"),
    # Same geometry as reference-tiny: 28 px, 2x2 patches, width 64.
    "tiny": CogVLMConfig(
        vocab_size=600,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_config=_vision(28, 32, 2, 4, 64),
        torch_dtype="float32",
    ),
    # The real image geometry (490 px, 1225 patches, 1227 image tokens) at laptop widths.
    "bench-490": CogVLMConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        vision_config=_vision(490, 256, 4, 4, 1024),
        torch_dtype="float32",
    ),
    "cogvlm2-llama3-chat-19b": _cogvlm2(**_COGVLM2_19B, template_version="chat"),
    "cogvlm2-llama3-chinese-chat-19b": _cogvlm2(**_COGVLM2_19B, template_version="chat"),
    # CogVLM2's real image geometry (1344 px, 96x96 patches, 48x48 after the conv, 2306 image
    # tokens) and vocabulary, with bench-490's vision widths and a narrower decoder (4 query heads
    # per KV head, as the 19B).
    "bench-cogvlm2-1344": _cogvlm2(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_multi_query_heads=2,
        vision_config=_vision(1344, 256, 4, 4, 1024),
        torch_dtype="float32",
    ),
}


def get_preset(name: str) -> CogVLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise CheckpointError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


__all__ = [
    "ACTIVATIONS",
    "LANGUAGE_TOKEN_TYPE",
    "LLAMA3_BOS_TOKEN_ID",
    "PRESETS",
    "VISION_TOKEN_TYPE",
    "CogVLMConfig",
    "VisionConfig",
    "get_preset",
]
