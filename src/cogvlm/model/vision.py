"""EVA2-CLIP vision tower: patch embedding plus post-sublayer-norm transformer layers.

Unlike a pre-norm ViT, each sublayer's *output* is layer-normed before the residual add
(`x + LN(attn(x))`), and there is no final norm. CogVLM2 then halves the patch grid with a
stride-2 conv before the adapter. Module names match the official weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ACTIVATIONS, CogVLMConfig, VisionConfig
from .adapter import GLU


class PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.in_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_embedding = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> tokens (N, 1 + P, Dv), cls first, positions added to all."""
        x = self.proj(images)  # (N, Dv, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (N, P, Dv)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)  # (N, 1 + P, Dv)
        positions = torch.arange(x.shape[1], device=x.device)
        return x + self.position_embedding(positions).unsqueeze(0)  # called, not read: offload hooks see it


class Attention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.query_key_value = nn.Linear(config.hidden_size, config.hidden_size * 3)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.query_key_value(x).view(n, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, T, K)
        # Non-causal, unmasked; SDPA's default scale is head_dim ** -0.5 as in the official code.
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, t, -1)  # (N, T, Dv)
        return self.output_dropout(self.dense(out))


class MLP(nn.Module):
    """fc2(act(fc1(x))), act = vision_config.hidden_act (exact GELU in every released config)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(nn.Module):
    """One ViT layer (the official class name, kept whole by device maps)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EVA2CLIPModel(nn.Module):
    """Pixels -> image tokens for the decoder: ViT, drop cls, (CogVLM2: stride-2 conv), GLU adapter,
    then boi/eoi around."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = PatchEmbedding(vision)
        self.transformer = Transformer(vision)
        dv = vision.hidden_size
        self.conv = nn.Conv2d(dv, dv, kernel_size=2, stride=2) if config.vision_conv else None
        self.linear_proj = GLU(dv, config.hidden_size, config.intermediate_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) -> (N, G + 2, D), G image tokens (P, or P / 4 after the conv)."""
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # (N, P, Dv), cls dropped
        if self.conv is not None:
            x = self._halve_grid(x)  # (N, P / 4, Dv)
        x = self.linear_proj(x)  # (N, G, D)
        n = x.shape[0]
        return torch.cat((self.boi.expand(n, -1, -1), x, self.eoi.expand(n, -1, -1)), dim=1)

    def _halve_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, Dv) -> (N, P / 4, Dv): the patches as their row-major (g, g) grid through the conv."""
        n, p, dv = x.shape
        side = math.isqrt(p)
        grid = x.transpose(1, 2).reshape(n, dv, side, side)  # (N, Dv, g, g)
        return self.conv(grid).flatten(2).transpose(1, 2)  # (N, (g/2)^2, Dv), row-major again
