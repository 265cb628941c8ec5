"""CogVLM in plain PyTorch.

Shapes in comments use: B batch, T tokens, S image side, P patches, N images,
D decoder width, Dv ViT width, H heads, K head dim, V vocabulary.

The names whose modules import torch (`load`, `Pipeline`, `CogVLMForCausalLM`, ...) are imported
on first use, so `import cogvlm` (and the `cogvlm` command's argument checks) need no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import PRESETS, CogVLMConfig, VisionConfig, get_preset
from .errors import CheckpointError, CogVLMError, ImageError, PromptError, SettingsError
from .lazy import lazy_names

if TYPE_CHECKING:
    from .batch import batch_infer
    from .dropin import CogVLMForCausalLM
    from .generation import GenerationConfig
    from .pipeline import GroundingResult, Pipeline, load
    from .tokenizer import load_tokenizer

#: Public names imported on first use, and the module of each.
_LAZY = {
    "load": "pipeline",
    "Pipeline": "pipeline",
    "GroundingResult": "pipeline",
    "batch_infer": "batch",
    "CogVLMForCausalLM": "dropin",
    "GenerationConfig": "generation",
    "load_tokenizer": "tokenizer",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "load",
    "Pipeline",
    "GroundingResult",
    "batch_infer",
    "CogVLMForCausalLM",
    "CogVLMConfig",
    "VisionConfig",
    "PRESETS",
    "get_preset",
    "GenerationConfig",
    "load_tokenizer",
    "CogVLMError",
    "CheckpointError",
    "ImageError",
    "PromptError",
    "SettingsError",
]
__version__ = "0.1.0"
