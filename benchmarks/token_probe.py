"""Do a model's image tokens tell one kind from another? Probes trained on the frozen tokens.

    python benchmarks/token_probe.py [--model DIR [--tokenizer DIR]] [--scenes 2000] [--seed 0]

For each pair (rectangle / square, ellipse / circle): `--scenes` varied scenes of one shape of the
pair, sized by area (`match_area`, so size tells nothing); the image tokens RMS-normalised as each
decoder layer reads them; two probes fitted on 80% and scored on the rest, by size band of the
shape's longer side: the tokens' mean then an MLP, and attention pooling (4 learned queries) then
an MLP, which is about what one decoder layer could read. A pair near 0.5 with attention pooling
is a difference the language stages cannot learn from these tokens (issue 22).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from torch import nn

import cogvlm
from cogvlm.image import preprocess
from cogvlm.synthetic.varied import make_varied_scene

PAIRS = (("rectangle", "square"), ("ellipse", "circle"))
BANDS = ((0.0, 0.15), (0.15, 0.35), (0.35, float("inf")))  # the longer side over the canvas's shorter


class MeanProbe(nn.Module):
    """(N, P, D) tokens -> 2 logits from their mean."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(tokens.mean(1))


class AttentionProbe(nn.Module):
    """(N, P, D) tokens -> 2 logits from `heads` learned queries' attention over them."""

    def __init__(self, dim: int, heads: int = 4, width: int = 64) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.query = nn.Parameter(torch.randn(heads, width) * 0.1)
        self.key, self.value = nn.Linear(dim, heads * width), nn.Linear(dim, heads * width)
        self.out = nn.Sequential(nn.Linear(heads * width, 64), nn.GELU(), nn.Linear(64, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, p, _ = tokens.shape
        keys = self.key(tokens).view(n, p, self.heads, self.width)  # (N, P, H, W)
        values = self.value(tokens).view(n, p, self.heads, self.width)
        weights = torch.einsum("nphw,hw->nhp", keys, self.query).softmax(-1)  # (N, H, P)
        return self.out(torch.einsum("nhp,nphw->nhw", weights, values).reshape(n, -1))


def scenes(pair: tuple[str, str], n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels (N, 3, S, S), label (N,) 1 for pair[0], longer side over the canvas (N,))."""
    pixels, labels, extents = [], [], []
    i = 0
    while len(labels) < n:
        scene = make_varied_scene(random.Random(f"{seed}:{i}"), max_shapes=1, max_aspect=1.333, match_area=True)
        i += 1
        if not scene.shapes or scene.shapes[0].kind not in pair:
            continue
        shape = scene.shapes[0]
        pixels.append(preprocess(scene.render(), size))
        labels.append(int(shape.kind == pair[0]))
        x0, y0, x1, y1 = shape.box
        extents.append(max(x1 - x0, y1 - y0) / min(scene.width, scene.height))
    return torch.stack(pixels), torch.tensor(labels), torch.tensor(extents)


@torch.no_grad()
def image_tokens(model: nn.Module, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, P, D) image tokens without boi/eoi, RMS-normalised, in float32."""
    out = []
    for start in range(0, len(pixels), batch):
        tokens = model.model.encode_images(pixels[start : start + batch].to(model.dtype))[:, 1:-1].float()
        out.append(F.rms_norm(tokens, tokens.shape[-1:]))
    return torch.cat(out)


def fit(probe: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, epochs: int = 60) -> nn.Module:
    """The probe fitted by AdamW on (tokens, labels), batches of 64."""
    optimizer = torch.optim.AdamW(probe.parameters(), 3e-3, weight_decay=0.01)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(probe(tokens[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--scenes", type=int, default=2000, help="scenes per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = cogvlm.load(args.model, tokenizer=args.tokenizer, device="cpu").model.eval()
    size = model.config.vision_config.image_size
    for pair in PAIRS:
        pixels, labels, extents = scenes(pair, args.scenes, args.seed, size)
        tokens = image_tokens(model, pixels)
        split = int(0.8 * len(labels))
        print(f"{pair[0]} / {pair[1]}: {split} fitted, {len(labels) - split} held out")
        for name, kind in (("mean", MeanProbe), ("attention", AttentionProbe)):
            torch.manual_seed(args.seed)
            probe = fit(kind(tokens.shape[-1]), tokens[:split], labels[:split])
            with torch.no_grad():
                right = (probe(tokens[split:]).argmax(-1) == labels[split:]).float()
                fitted = (probe(tokens[:split]).argmax(-1) == labels[:split]).float().mean()
            held = extents[split:]
            bands = ", ".join(f"{lo:.2f}-{hi:.2f} {right[(held >= lo) & (held < hi)].mean():.3f}" for lo, hi in BANDS)
            print(f"  {name:<9} held out {right.mean():.3f} ({bands}); on its fit {fitted:.3f}")


if __name__ == "__main__":
    main()
