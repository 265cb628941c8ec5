"""The `patches` objective: dense pretraining of the vision tower on synthetic scenes.

Every patch predicts, through a throwaway linear head, the kind, colour and box of the shape
that covers it (or background), read from the generator's ground truth. The head reads either
the ViT's patch features (only the ViT trains) or the image tokens the decoder sees, after the
GLU adapter (ViT and adapter train). It is only an initialisation: the model stays a plain
CogVLM and the head is dropped when the next stage loads the checkpoint. Why: with the
language-modelling loss alone, a tiny ViT learns colour but hardly shape or place, and an
adapter trained that way drops place even where the ViT carries it (issue 4 notes); a per-patch
target gives a signal at every patch of every image instead of one answer token per question.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from .. import synthetic
from ..config import CogVLMConfig
from ..dropin import CogVLMForCausalLM
from ..image import preprocess
from .config import TrainError
from .data import HELDOUT_SEED_OFFSET, check_shape_counts, check_varied_options, pick_source
from .modes import set_trainable

HEAD_FILE = "patch_head.safetensors"
#: A patch is labelled with the shape covering most of it when that covers >= this share of it.
MIN_COVER = 0.1
#: Weight of the box L1 (box coordinates in 0..1) against the two cross-entropies.
BOX_WEIGHT = 5.0
N_KINDS, N_COLORS = 1 + len(synthetic.KINDS), len(synthetic.COLORS)  # kind 0 = background
#: What the head reads (config key `patch_features`) -> the parameter groups that train.
TRAINED_PARTS = {"vit": ("@vit",), "image_tokens": ("@vit", "@adapter")}


def patch_targets(scene: synthetic.Scene, grid: int) -> dict[str, torch.Tensor]:
    """Per patch of a grid x grid ViT (row-major, as the patch embedding flattens): `kind`
    (0 background, else 1 + KINDS index), `color` (COLORS index, -100 on background) and `box`
    (x0, y0, x1, y1 of the shape as fractions of the image, 0 on background)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for i, shape in enumerate(scene.shapes):  # drawn as render() draws them: later shapes on top
        synthetic.draw_shape(draw, shape.kind, shape.box, i + 1, shape.outline, shape.variant)
    owner = np.asarray(mask)
    rows = np.linspace(0, scene.height, grid + 1).round().astype(int)
    cols = np.linspace(0, scene.width, grid + 1).round().astype(int)
    kind = torch.zeros(grid * grid, dtype=torch.long)
    color = torch.full((grid * grid,), -100, dtype=torch.long)
    box = torch.zeros(grid * grid, 4)
    colors = list(synthetic.COLORS)
    for r in range(grid):
        for c in range(grid):
            block = owner[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]
            counts = np.bincount(block.ravel(), minlength=len(scene.shapes) + 1)
            counts[0] = 0
            best = int(counts.argmax())
            if counts[best] < MIN_COVER * block.size:
                continue
            shape, j = scene.shapes[best - 1], r * grid + c
            kind[j] = 1 + synthetic.KINDS.index(shape.kind)
            color[j] = colors.index(shape.color)
            box[j] = torch.tensor(shape.box, dtype=torch.float32) / torch.tensor(
                [scene.width, scene.height, scene.width, scene.height]
            )
    return {"kind": kind, "color": color, "box": box}


class PatchDataset(Dataset):
    """Item i: scene i of a weighted choice among synthetic sources, as pixels and patch targets.

    Scene k of a source with seed s is `draw_scene(random.Random(f"{s}:{k}"), size, varied=varied,
    easy=easy, max_shapes=max_shapes, max_aspect=max_aspect, match_area=match_area)`, the scenes
    the language tasks of the same seed are asked about.
    """

    def __init__(self, specs: Sequence[dict], config: CogVLMConfig, seed: int, heldout: bool = False) -> None:
        self.sources = [self._source(spec, config, heldout) for spec in specs]
        self.weights = [float(spec.get("weight", 1.0)) for spec in specs]
        vision = config.vision_config
        self.image_size, self.grid = vision.image_size, vision.image_size // vision.patch_size
        self.seed = seed

    @staticmethod
    def _source(spec: dict, config: CogVLMConfig, heldout: bool) -> tuple[int, int, bool, bool, dict]:
        spec = dict(spec)
        if spec.pop("type", None) != "synthetic":
            raise TrainError(
                "objective patches: every data source must be {type: synthetic, ...} "
                "(the targets come from the scene generator)"
            )
        spec.pop("weight", None)
        seed = int(spec.pop("seed", 0)) + (HELDOUT_SEED_OFFSET if heldout else 0)
        size = spec.pop("size", None) or config.vision_config.image_size
        easy, varied = bool(spec.pop("easy", False)), bool(spec.pop("varied", False))
        shapes = {key: spec.pop(key, None) for key in ("max_shapes", "max_aspect")}
        shapes["match_area"] = spec.pop("match_area", False)
        if spec:
            raise TrainError(
                f"objective patches: synthetic source option(s) {', '.join(sorted(spec))} "
                "do not apply (use seed, size, easy, varied, max_shapes, max_aspect, match_area, weight)"
            )
        check_shape_counts(1, shapes["max_shapes"], varied)
        check_varied_options(shapes["max_aspect"], shapes["match_area"], varied)
        return seed, int(size), easy, varied, shapes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed, size, easy, varied, shapes = self.sources[pick_source(self.seed, index, self.weights)]
        rng = random.Random(f"{seed}:{index}")
        scene = synthetic.draw_scene(rng, size, varied=varied, easy=easy, **shapes)
        return {"pixels": preprocess(scene.render(), self.image_size), **patch_targets(scene, self.grid)}


class PatchHead(nn.Module):
    """Linear read-out of each patch feature: kind logits, colour logits, box (sigmoid)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, N_KINDS + N_COLORS + 4)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (N, P, Dv) -> kind (N, P, 1 + K), colour (N, P, C), box (N, P, 4)."""
        out = self.proj(features).float()
        return out[..., :N_KINDS], out[..., N_KINDS : N_KINDS + N_COLORS], out[..., N_KINDS + N_COLORS :].sigmoid()


class PatchPretraining(nn.Module):
    """A CogVLM and the patch head, trained as one module (so DDP and checkpoints see both).

    Saved as the CogVLM's official layout plus `patch_head.safetensors`, so the folder loads as a
    plain CogVLM for the next stage and resumes with its head here.
    """

    def __init__(self, cogvlm: CogVLMForCausalLM, features: str = "vit") -> None:
        super().__init__()
        self.cogvlm, self.features = cogvlm, features
        config = cogvlm.config
        self.head = PatchHead(config.vision_config.hidden_size if features == "vit" else config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.features == "image_tokens":
            # RMS-normalised as every decoder layer first normalises them: a language-trained
            # adapter's tokens can be far larger than unit scale and would saturate the head.
            tokens = self.cogvlm.model.encode_images(pixels)[:, 1:-1]  # (N, P, D), boi/eoi dropped
            return self.head(F.rms_norm(tokens, tokens.shape[-1:]))
        vision = self.cogvlm.model.vision
        features = vision.transformer(vision.patch_embedding(pixels))[:, 1:]  # (N, P, Dv), cls dropped
        return self.head(features)

    def save_pretrained(self, folder: str | Path, max_shard_size: str = "5GB") -> None:
        self.cogvlm.save_pretrained(folder, max_shard_size=max_shard_size)
        save_file(self.head.state_dict(), str(Path(folder) / HEAD_FILE))

    def load_pretrained(self, folder: Path, cogvlm_state: dict[str, torch.Tensor]) -> None:
        self.cogvlm.load_state_dict(cogvlm_state, strict=True)
        self.head.load_state_dict(load_file(folder / HEAD_FILE), strict=True)


def patch_model(model: CogVLMForCausalLM, features: str = "vit") -> PatchPretraining:
    """The module the `patches` objective trains: a new head on `features` of `model` ("vit" or
    "image_tokens"), and the parts of `model` that compute them."""
    set_trainable(model, TRAINED_PARTS[features])
    return PatchPretraining(model, features)


def patch_loss_sum(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed over patches: kind CE + (on shapes) colour CE + BOX_WEIGHT * mean box L1."""
    return _loss_sum(model(batch["pixels"]), batch)


def _loss_sum(outputs: tuple[torch.Tensor, ...], batch: dict[str, Any]) -> torch.Tensor:
    kind, color, box = outputs
    shape = batch["kind"] > 0
    loss = F.cross_entropy(kind.flatten(0, 1), batch["kind"].flatten(), reduction="sum")
    loss = loss + F.cross_entropy(color.flatten(0, 1), batch["color"].flatten(), reduction="sum")
    return loss + BOX_WEIGHT * (box - batch["box"]).abs().mean(-1)[shape].sum()


class PatchProbe:
    """Evaluator: patch loss and head accuracies on a fixed held-out batch (kind and colour on
    shape patches, background recall, box L1 in the 000-999 units of grounding answers)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, ctx: Any) -> dict[str, float]:
        batch = {k: v.to(ctx.accelerator.device) for k, v in self.batch.items()}
        outputs = ctx.model(batch["pixels"])
        kind, color, box = outputs
        shape = batch["kind"] > 0
        return {
            "eval_loss": float(_loss_sum(outputs, batch)) / batch["kind"].numel(),
            "eval_patch_kind_acc": float((kind.argmax(-1) == batch["kind"])[shape].float().mean()),
            "eval_patch_color_acc": float((color.argmax(-1) == batch["color"])[shape].float().mean()),
            "eval_patch_background_acc": float((kind.argmax(-1) == 0)[~shape].float().mean()),
            "eval_patch_box_l1": float((box - batch["box"]).abs()[shape].mean()) * 1000,
        }


__all__ = [
    "patch_targets",
    "PatchDataset",
    "PatchHead",
    "PatchPretraining",
    "patch_model",
    "patch_loss_sum",
    "PatchProbe",
    "HEAD_FILE",
    "TRAINED_PARTS",
]
