"""Does a model's ViT combine patches? Its attention, layer by layer, on the generator's varied scenes.

    python benchmarks/vit_attention.py [--model DIR] [--scenes 32] [--seed 78]

Printed per ViT layer: each head's mean attention entropy over the patches' queries (nats; one-hot
attention is 0, uniform over the 257 tokens of a 224-px image 5.55), the mean distance in patches
from a query patch to what it attends to (uniform: 8.3 on a 16 x 16 grid), and the residual stream's
norm; then the norms of what the patch embedding adds (pixels, position) and how far the image
tokens move when every attention sublayer is left out (`x + LN(attn(x))` -> `x`). A ViT whose
attention is one-hot and whose tokens hardly move without it sees each patch on its own: it can
name a colour but not the outline that tells a rectangle from a square.
"""

from __future__ import annotations

import argparse
import random

import torch

from cogvlm.dropin import CogVLMForCausalLM
from cogvlm.image import preprocess
from cogvlm.loading import DEFAULT_MODEL
from cogvlm.model.vision import EVA2CLIPModel, TransformerLayer
from cogvlm.synthetic.varied import make_varied_scene


def attention_probs(layer: TransformerLayer, x: torch.Tensor) -> torch.Tensor:
    """x (N, T, Dv) -> the layer's attention probabilities (N, H, T, T), as its SDPA computes them."""
    a = layer.attention
    n, t, _ = x.shape
    q, k, _ = a.query_key_value(x).view(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (N, H, T, K)
    return (q @ k.transpose(-1, -2) * a.head_dim**-0.5).softmax(-1)


def tokens_without_attention(vision: EVA2CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """The image tokens (boi/eoi dropped) with every layer's attention sublayer left out:
    x -> x + LN(mlp(x)); then the CogVLM2 conv where there is one, and the adapter, as the model's own."""
    x = vision.patch_embedding(images)
    for layer in vision.transformer.layers:
        x = x + layer.post_attention_layernorm(layer.mlp(x))
    x = x[:, 1:]  # (N, P, Dv), cls dropped
    return vision.linear_proj(vision._halve_grid(x) if vision.conv is not None else x)


@torch.no_grad()
def report(vision: EVA2CLIPModel, images: torch.Tensor) -> None:
    embed = vision.patch_embedding
    pixels = embed.proj(images).flatten(2).transpose(1, 2)  # (N, P, Dv)
    grid = round(pixels.shape[1] ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    where = torch.stack((rows.flatten(), cols.flatten()), -1).float()
    distance = torch.cdist(where, where)  # (P, P) in patches
    x = embed(images)
    print(f"{'layer':<6} {'entropy per head (nats)':<30} {'distance per head':<28} stream norm")
    for i, layer in enumerate(vision.transformer.layers):
        probs = attention_probs(layer, x)[:, :, 1:]  # (N, H, P, T): the patches' queries
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean((0, 2))
        reach = (probs[..., 1:] * distance).sum(-1).mean((0, 2))
        print(
            f"{i:<6} {' '.join(f'{v:5.2f}' for v in entropy):<30} {' '.join(f'{v:5.1f}' for v in reach):<28} "
            f"{x[:, 1:].norm(dim=-1).mean():.1f}"
        )
        x = layer(x)
    position = embed.position_embedding.weight[1:].norm(dim=-1).mean()
    print(f"patch embedding: pixels {pixels.norm(dim=-1).mean():.1f}, position {position:.1f} (mean norms)")
    full = vision(images)[:, 1:-1]  # (N, G, D), boi/eoi dropped
    alone = tokens_without_attention(vision, images)
    print(f"image tokens without attention: {(alone - full).norm() / full.norm():.3f} of their norm moved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=78)
    args = parser.parse_args()
    model = CogVLMForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    vision, size = model.model.vision.eval(), model.config.vision_config.image_size
    scenes = (make_varied_scene(random.Random(f"{args.seed}:{i}"), max_aspect=1.333) for i in range(args.scenes))
    report(vision, torch.stack([preprocess(scene.render(), size) for scene in scenes]))


if __name__ == "__main__":
    main()
