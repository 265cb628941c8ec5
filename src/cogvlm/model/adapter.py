"""The GLU adapter (`linear_proj` in the official weights) from ViT width to decoder width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GLU(nn.Module):
    """Linear -> LayerNorm(eps 1e-5) -> GELU -> SiLU-gated FFN, all projections without bias."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)  # default eps 1e-5, as the official adapter
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, P, Dv) -> (N, P, D)."""
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))
