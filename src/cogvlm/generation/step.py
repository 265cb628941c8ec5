"""Prefill the prompt, decode one token: the two model calls generation is made of."""

from __future__ import annotations

from typing import Any

import torch

from ..config import LANGUAGE_TOKEN_TYPE
from ..model.positions import build_position_ids
from .cache import KVCache


def prefill(model: Any, batch: dict[str, Any], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole prompt once; returns last-position logits (B, V) and position ids (B, T)."""
    position_ids = build_position_ids(batch["token_type_ids"], batch["attention_mask"])
    out = model(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        images=batch.get("images"),
        position_ids=position_ids,
        kv_cache=cache,
        cache_start=0,
        logits_to_keep=1,
    )
    return out.logits[:, -1], position_ids


def decode_one_token(
    model: Any,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: KVCache,
    cache_start: int,
) -> torch.Tensor:
    """One language-typed token per row at `cache_start`; returns logits (B, V)."""
    out = model(
        input_ids=tokens[:, None],
        token_type_ids=torch.full_like(tokens[:, None], LANGUAGE_TOKEN_TYPE),
        attention_mask=attention_mask,
        position_ids=positions[:, None],
        kv_cache=cache,
        cache_start=cache_start,
    )
    return out.logits[:, -1]
