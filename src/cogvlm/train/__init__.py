"""Training: data, modes (from scratch, CogVLM's expert recipe, LoRA), and the accelerate loop.

`run(config, overrides)` trains and returns the final checkpoint (`cogvlm train` calls it);
`merge_lora` turns a LoRA checkpoint into a plain one. Settings:
`cogvlm.train.config`; example: configs/example-finetune.yaml.
"""

from .config import TrainConfig, TrainError, load_config
from .loop import EvalContext, Evaluator, ShuffledImagesDiagnostic, run
from .modes import copy_language_to_vision, merge_lora

__all__ = [
    "run",
    "merge_lora",
    "copy_language_to_vision",
    "TrainConfig",
    "TrainError",
    "load_config",
    "EvalContext",
    "Evaluator",
    "ShuffledImagesDiagnostic",
]
