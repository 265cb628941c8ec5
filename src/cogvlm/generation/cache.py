"""The preallocated KV cache: (B, Hkv, S_max, K) keys and values per layer, written at explicit
positions; a step never concatenates over it."""

from __future__ import annotations

from typing import Any

import torch

from ..loading.placement import execution_device


class KVCache:
    """Per-layer (keys, values), each (B, Hkv, S_max, K), in the model's dtype and device.

    Each layer's cache lives on that layer's execution device (device maps, offloaded layers).
    The model gets this object, not its list: accelerate's device hooks copy lists of tensors
    to their device, which would send the writes to a copy; an object they leave alone.
    """

    def __init__(self, model: Any, batch: int, max_len: int) -> None:
        cfg = model.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # grouped-query: the KV heads only
        dtype = model.model.embed_tokens.weight.dtype  # quantised weights do not carry the compute dtype
        self.layers = []
        for layer in model.model.layers:
            device = execution_device(layer.input_layernorm)
            self.layers.append(
                (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            )

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.layers = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.layers]
