"""CogVLM in plain PyTorch.

Shapes in comments use: B batch, T tokens, S image side, P patches, N images,
D decoder width, Dv ViT width, H heads, K head dim, V vocabulary.
"""

from .batch import batch_infer
from .config import PRESETS, CogVLMConfig, VisionConfig, get_preset
from .dropin import CogVLMForCausalLM
from .errors import CheckpointError, CogVLMError, ImageError, PromptError, SettingsError
from .generation import GenerationConfig
from .pipeline import GroundingResult, Pipeline, load
from .tokenizer import load_tokenizer

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
