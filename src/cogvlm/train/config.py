"""Training settings: one flat, frozen `TrainConfig` read from YAML or a dict, `--key value` on top.

Keys (all optional except `data`; `configs/example-finetune.yaml` shows them in use):

Model and mode
  model                    folder of an official-layout checkpoint to start from
  model_config             no `model`: a preset name ("tiny") or a dict of config fields, with an
                           optional "preset" key as the base ({preset: tiny, vision_config: {...}})
  tokenizer                tokenizer folder (default: `model`)
  model_dtype              float32 (default: fp32 master weights) | bfloat16 | float16: the dtype
                           the model is loaded in; bfloat16 with mode lora halves the frozen base
                           (the LoRA adapters stay float32)
  mode                     from_scratch | expert | lora (see `cogvlm.train.modes`). Weights are
                           initialised with `CogVLMForCausalLM.init_weights` exactly when no `model` is given.
  train_vit                expert: train the ViT too (default false)
  reinit                   patterns (as in lr_groups, e.g. [@adapter]) of parameters re-drawn from
                           the from-scratch init before the stage trains (not on resume)
  rescale                  {PATTERN: factor}: multiply the matching parameters by factor before the
                           stage trains, after reinit (not on resume); e.g. the adapter's last
                           projection, to make the image tokens larger next to the decoder's residual
  image_size               a new input size for the ViT (a multiple of its patch size): its position
                           embeddings are interpolated bicubically over the patch grid (cls kept), as
                           CogVLM went from 224 to 490 px; the checkpoint's config records the size
  vision_layers            a deeper ViT: layers appended after the trained ones, drawn from the
                           from-scratch init except their two sublayer norms, which start at zero so
                           that each new layer adds nothing (x + LN(f(x)) = x) and the model answers
                           as before until they train; the checkpoint's config records the depth
  objective                lm (default): next-token loss on the assistant tokens | patches: only the
                           vision side trains (see patch_features), each patch predicting the kind,
                           colour and box of the synthetic shape under it through a throwaway head
                           (`cogvlm.train.patches`; synthetic data only: seed, size, easy,
                           varied, max_shapes, max_aspect, match_area; mode from_scratch); a
                           pretraining stage for the ViT and adapter
  patch_features           objective patches: what the head reads; vit (default: the ViT's patch
                           features, only the ViT trains) | image_tokens (the decoder's image tokens,
                           after the adapter: ViT and adapter train)
  copy_language_to_vision  expert: start the vision experts as copies of the language experts
                           (CogVLM's recipe, default true; set false to fine-tune a trained CogVLM)
  lora_r, lora_alpha, lora_dropout, lora_targets   lora: rank, scale, dropout, module names
Data
  data                     list of sources, each a dict with `type`:
                           {type: jsonl, path: FILE}, {type: sft311k, path: FOLDER},
                           {type: synthetic, seed: 0, size: null, tasks: null, easy: false,
                           per_scene: 3, turns: 1, min_shapes: 1, max_shapes: null, varied: false};
                           every source takes `weight` (sampling share, default 1) and
                           `template_version` (default: the record's, else the model's); synthetic
                           `turns` > 1 asks several vqa questions per conversation, a task named
                           twice in `tasks` is drawn twice as often, `min_shapes` (1-4, varied 1-6)
                           draws only scenes that crowded, `max_shapes` (default the most) none more
                           crowded (varied scenes of fewer shapes have room for larger ones), and
                           `varied` draws the scenes people draw (any canvas and background,
                           outlines, anti-aliasing, JPEG; `size` then does not apply);
                           varied `max_aspect` (default: canvases 0.7-1.45 wide per high) keeps
                           canvases within 1/max_aspect-max_aspect (4:3 = 1.333); varied
                           `match_area` (default false) sizes rectangles and ellipses by area as
                           squares and circles are, not by their longer side; `relations`
                           (default [left, right, above, below]) are the words relation questions
                           use: [left, above] asks each comparison one way (no XOR to learn)
  eval_data                sources of the diagnostic batch (default: `data`, synthetic seeds moved
                           to a held-out range; jsonl/sft311k sources are reused as they are)
  max_length               examples longer than this many tokens are reported and skipped
  num_workers              DataLoader worker processes per training process
Optimisation
  lr, weight_decay, betas, max_grad_norm (0: no clipping)
  lr_groups                [{params: [PATTERN, ...], lr: X}, ...]: first match wins; a pattern is
                           a name prefix, a glob over official parameter names, or one of
                           @language, @vision_experts, @adapter, @vit; lr 0 freezes the part
  warmup_steps, min_lr_ratio   linear warmup, then cosine down to lr * min_lr_ratio at max_steps
  batch_size (per process), grad_accum, max_steps
  stop_at                  end the run at this step, the schedule still max_steps' (a stage that
                           was stopped early, recorded so that it reruns as it ran)
  mixed_precision          no | bf16 | fp16 (autocast; falls back to "no" where the device lacks it)
  gradient_checkpointing   recompute decoder layers in backward (less memory, more compute)
  cpu                      force the CPU (implied where no accelerator device exists; needed for
                           several CPU processes, which then use gloo)
  find_unused_parameters   DDP: set true when some batches have no image at all
Stages
  stages                   a list of override dicts run one after the other, each starting from
                           the previous stage's final weights (its `model`), in
                           output_dir/<name or stageN>; e.g. an easy warm-up, then the full mix
Run
  output_dir, seed, save_every (0: only at the end), keep_last (0: keep all),
  eval_every (0: never), eval_batch_size, log_every, save_shard_size,
  resume                   false | true (the latest complete checkpoint in output_dir) | a path
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import CogVLMError

MODES = ("from_scratch", "expert", "lora")
OBJECTIVES = ("lm", "patches")
PATCH_FEATURES = ("vit", "image_tokens")  # what the patches objective's head reads
MIXED_PRECISION = ("no", "bf16", "fp16")
DEFAULT_LORA_TARGETS = (
    "vision_expert_query_key_value",
    "vision_expert_dense",
    "vision_mlp.gate_proj",
    "vision_mlp.up_proj",
    "vision_mlp.down_proj",
)


class TrainError(CogVLMError):
    """A training setting, data source or checkpoint that cannot be used."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; see the module docstring for what each key means."""

    data: list = field(default_factory=list)
    model: str | None = None
    model_config: Any = None
    model_dtype: str = "float32"
    tokenizer: str | None = None
    mode: str = "from_scratch"
    objective: str = "lm"
    patch_features: str = "vit"
    train_vit: bool = False
    reinit: list = field(default_factory=list)
    rescale: dict = field(default_factory=dict)
    image_size: int | None = None
    vision_layers: int | None = None
    copy_language_to_vision: bool = True
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    eval_data: list | None = None
    max_length: int = 2048
    num_workers: int = 0
    lr: float = 1e-4
    lr_groups: list = field(default_factory=list)
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    stop_at: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu: bool = False
    find_unused_parameters: bool = False
    output_dir: str = "runs/train"
    seed: int = 0
    save_every: int = 500
    keep_last: int = 3
    eval_every: int = 0
    eval_batch_size: int = 8
    log_every: int = 1
    save_shard_size: str = "5GB"
    resume: Any = False
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(TrainConfig)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, value: Any) -> Any:
    """A value of the key's type; strings (from flags, or YAML's `1e-3`) are parsed."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    kinds = [a for a in args if a is not type(None)] or [hint]
    if not isinstance(value, str) or str in kinds:
        return value
    text = value.strip()
    if type(None) in args and text.lower() in ("none", "null", ""):
        return None
    kind = kinds[0]
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.lower() in _TRUE
        if kind in (int, float):
            return kind(text)
        parsed = yaml.safe_load(text)  # lists, dicts and `resume` (true/false/path)
        return text if kind is list and not isinstance(parsed, list) else parsed
    except (ValueError, yaml.YAMLError):
        raise TrainError(f"--{name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"mode '{cfg.mode}' (use {', '.join(MODES)})")
    if cfg.objective not in OBJECTIVES:
        problems.append(f"objective '{cfg.objective}' (use {', '.join(OBJECTIVES)})")
    if cfg.objective == "patches" and cfg.mode != "from_scratch":
        problems.append("objective patches trains the ViT of a plain model: use mode from_scratch")
    if cfg.patch_features not in PATCH_FEATURES:
        problems.append(f"patch_features '{cfg.patch_features}' (use {' or '.join(PATCH_FEATURES)})")
    if not isinstance(cfg.rescale, dict) or not all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in cfg.rescale.values()
    ):
        problems.append(f"rescale {cfg.rescale!r} (use a mapping of parameter pattern to a positive factor)")
    if cfg.image_size is not None and not _positive_int(cfg.image_size):
        problems.append(f"image_size {cfg.image_size!r} (use a positive number of pixels)")
    if cfg.image_size is not None and cfg.mode == "lora":
        problems.append(
            "image_size with mode lora (LoRA merges onto the base as stored: resize it in "
            "a from_scratch or expert stage first)"
        )
    if cfg.vision_layers is not None and not _positive_int(cfg.vision_layers):
        problems.append(f"vision_layers {cfg.vision_layers!r} (use a positive number of layers)")
    if cfg.vision_layers is not None and cfg.mode == "lora":
        problems.append("vision_layers with mode lora (grow the ViT in a from_scratch or expert stage first)")
    if cfg.model_dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"model_dtype '{cfg.model_dtype}' (use float32, bfloat16 or float16)")
    if cfg.mixed_precision not in MIXED_PRECISION:
        problems.append(f"mixed_precision '{cfg.mixed_precision}' (use {', '.join(MIXED_PRECISION)})")
    if not cfg.data and not cfg.stages:
        problems.append("data is empty (give at least one source)")
    if cfg.model is None and cfg.model_config is None:
        problems.append("neither model nor model_config is set")
    if cfg.model is None and cfg.tokenizer is None:
        problems.append("tokenizer is not set (needed when there is no model folder)")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.max_steps:
        problems.append(f"stop_at {cfg.stop_at} must be between 1 and max_steps ({cfg.max_steps})")
    if problems:
        raise TrainError("bad training config: " + "; ".join(problems))


def load_config(config: dict | str | Path, overrides: dict | None = None) -> TrainConfig:
    """A validated TrainConfig from a dict or YAML file, with `overrides` (flags) applied on top."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise TrainError(f"{path}: no such config file")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(config, dict):
        raise TrainError("a training config must be a mapping of keys to values")
    merged = {**config, **(overrides or {})}
    unknown = sorted(set(merged) - set(_HINTS))
    if unknown:
        raise TrainError(f"unknown config key(s) {', '.join(unknown)} (known: {', '.join(_HINTS)})")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    _validate(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved settings, as YAML, next to the run's outputs (for reproducing it)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["TrainConfig", "TrainError", "load_config", "save_config", "MODES", "DEFAULT_LORA_TARGETS"]
