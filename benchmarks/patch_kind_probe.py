"""What a `patches` checkpoint's head names each shape: the kind most of its patches get, by kind and size.

    python benchmarks/patch_kind_probe.py CHECKPOINT [--scenes 400] [--seed 777]

CHECKPOINT is a folder saved by a `cogvlm train` stage with `objective: patches` and `patch_features:
vit` (a CogVLM plus `patch_head.safetensors`). `--scenes` varied scenes of one shape each, sized by
area (`match_area`, so that size tells nothing of the kind), canvases within 4:3; each shape's
patches are those the trainer labels with it. Printed: right / asked per kind and per size band of
the shape's longer side over the canvas's shorter (issue 22: can a ViT of this size learn kinds
from outlines, and in how many steps).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from cogvlm import synthetic
from cogvlm.dropin import CogVLMForCausalLM
from cogvlm.image import preprocess
from cogvlm.synthetic.varied import make_varied_scene
from cogvlm.train.patches import HEAD_FILE, PatchPretraining, patch_targets

BANDS = ((0.0, 0.15, "<15%"), (0.15, 0.35, "15-35%"), (0.35, float("inf"), ">35%"))


def band(scene: synthetic.Scene) -> str:
    """The size band of a one-shape scene's shape."""
    x0, y0, x1, y1 = scene.shapes[0].box
    share = max(x1 - x0, y1 - y0) / min(scene.width, scene.height)
    return next(name for low, high, name in BANDS if low <= share < high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    model = PatchPretraining(CogVLMForCausalLM.from_pretrained(args.checkpoint), "vit").eval()
    model.head.load_state_dict(load_file(args.checkpoint / HEAD_FILE))
    vision = model.cogvlm.config.vision_config
    grid = vision.image_size // vision.patch_size
    right, asked = Counter(), Counter()
    for start in range(0, args.scenes, 50):
        rngs = (random.Random(f"{args.seed}:{i}") for i in range(start, min(args.scenes, start + 50)))
        scenes = [make_varied_scene(r, max_shapes=1, max_aspect=1.333, match_area=True) for r in rngs]
        scenes = [s for s in scenes if s.shapes]  # a shape the background would hide is left out
        pixels = torch.stack([preprocess(s.render(), vision.image_size) for s in scenes])
        with torch.no_grad():
            kinds = model(pixels)[0].argmax(-1)  # (N, P): 0 background, else 1 + KINDS index
        for scene, predicted in zip(scenes, kinds):
            on = patch_targets(scene, grid)["kind"] > 0
            if not on.any():
                continue
            votes = torch.bincount(predicted[on], minlength=1 + len(synthetic.KINDS))
            votes[0] = 0  # a shape's kind, not "background"
            kind = scene.shapes[0].kind
            hit = int(votes.argmax()) == 1 + synthetic.KINDS.index(kind)
            for key in ("all", f"all {band(scene)}", kind, f"{kind} {band(scene)}"):
                right[key] += hit
                asked[key] += 1
    for key in sorted(asked):
        print(f"{key:20s} {right[key]:4d} / {asked[key]:4d}  {right[key] / asked[key]:.2f}")


if __name__ == "__main__":
    main()
