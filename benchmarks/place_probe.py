"""Where does a model lose place? A linear probe of each synthetic shape's box from the image tokens
and from every decoder layer's hidden states at the image positions.

    python benchmarks/place_probe.py [--model DIR [--tokenizer DIR]] [--scenes 300] [--seed 123457]

For each shape: the mean, over the patches whose centre lies in its box, of the RMS-normalised
features (as each decoder layer normalises its input); a ridge regression fitted on the first 80%
of shapes predicts the box (x0, y0, x1, y1 in 1/1000 of the side) of the other 20%. Printed per
row: the mean feature norm and the held-out mean absolute error per coordinate. A row much worse
than the one above it is a layer that drowns place (the default model's recipe, stage see8).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import cogvlm
from cogvlm.config import VISION_TOKEN_TYPE
from cogvlm.synthetic import iter_scenes

QUESTION = "Where is the object?"


def box_mask(box: tuple[int, int, int, int], grid: int, side: int) -> torch.Tensor:
    """(G*G,) mask of the patches whose centre lies in the pixel box."""
    x0, y0, x1, y1 = box
    centres = (torch.arange(grid) + 0.5) / grid * side
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # (G, G) each
    return ((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)).flatten()


def object_features(features: torch.Tensor, masks: list[torch.Tensor]) -> list[np.ndarray]:
    """(G*G, D) patch features -> the mean RMS-normalised feature under each mask."""
    normed = features / features.pow(2).mean(-1, keepdim=True).sqrt()
    return [normed[mask].mean(0).numpy() for mask in masks]


Row = tuple[str, float, np.ndarray]


def probe(pipeline: cogvlm.Pipeline, scenes: int, seed: int) -> tuple[list[Row], np.ndarray]:
    """Rows (name, mean norm, held-out box MAE per coordinate) and the predict-the-mean baseline."""
    model = pipeline.model.eval()
    layers = model.model.layers
    hidden: dict[int, torch.Tensor] = {}

    def keep(k: int):
        def hook(_module, _inputs, out) -> None:
            hidden[k] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]
    hooks.append(model.model.vision.register_forward_hook(keep(-1)))  # the image tokens
    names = ["image tokens"] + [f"after layer {k}" for k in range(len(layers))]
    features: list[list[np.ndarray]] = [[] for _ in names]
    norms: list[list[float]] = [[] for _ in names]
    targets = []
    try:
        with torch.no_grad():
            for _, scene, _ in iter_scenes(seed, scenes, per_scene=1):
                inputs = pipeline.build(QUESTION, scene.render(), template_version="vqa")
                ids, types = inputs["input_ids"][None], inputs["token_type_ids"][None]
                model(ids, types, torch.ones_like(ids), [inputs["images"]])
                patches = (types[0] == VISION_TOKEN_TYPE).nonzero().flatten()[1:-1]  # boi/eoi dropped
                rows = [hidden[-1][0, 1:-1]] + [hidden[k][0, patches] for k in range(len(layers))]
                grid = int(len(patches) ** 0.5)
                masks = [(s.box, box_mask(s.box, grid, scene.width)) for s in scene.shapes]
                shapes = [(box, mask) for box, mask in masks if mask.any()]
                for k, row in enumerate(rows):
                    row = row.float()
                    norms[k].append(float(row.norm(dim=-1).mean()))
                    features[k].extend(object_features(row, [m for _, m in shapes]))
                targets.extend(np.array(box) / scene.width * 1000 for box, _ in shapes)
    finally:
        for hook in hooks:
            hook.remove()
    y = np.stack(targets)
    split = int(len(y) * 0.8)
    results = []
    for name, feats, norm in zip(names, features, norms):
        x = np.stack(feats)
        x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-6)
        a = np.c_[x, np.ones(len(x))]
        w = np.linalg.solve(a[:split].T @ a[:split] + 3.0 * np.eye(a.shape[1]), a[:split].T @ y[:split])
        results.append((name, float(np.mean(norm)), np.abs(a[split:] @ w - y[split:]).mean(0)))
    return results, np.abs(y[split:] - y[:split].mean(0)).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123457)
    args = parser.parse_args()
    rows, baseline = probe(cogvlm.load(args.model, tokenizer=args.tokenizer), args.scenes, args.seed)
    print(f"{'features':<14} {'norm':>7}   box MAE per coordinate (1/1000)   mean")
    for name, norm, mae in rows + [("predict mean", float("nan"), baseline)]:
        print(f"{name:<14} {norm:7.1f}   {' '.join(f'{v:6.1f}' for v in mae)}   {mae.mean():6.1f}")


if __name__ == "__main__":
    main()
