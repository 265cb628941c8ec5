"""Prefill the prompt, decode one token: the two model calls generation is made of.

`decode_one_token` writes every row at one shared column (a `KVCache`); `decode_slots` writes each
row at its own slot's column (a `SlotCache`) and reads nothing back to the host: the positions,
the write index and the mask stay on the device, and the token types of a decode step (all
language) are a host tensor, so the network's count of image tokens is a host operation. That is
what lets `DecodeState` replay the step as a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import LANGUAGE_TOKEN_TYPE
from ..model.positions import build_position_ids
from .cache import KVCache, SlotCache


def prefill(model: Any, batch: dict[str, Any], cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole prompt once; returns last-position logits (B, V) and position ids (B, T).
    The batch's `image_features`, where given, stand in for its `images` (`ImageFeatureCache`)."""
    position_ids = build_position_ids(batch["token_type_ids"], batch["attention_mask"])
    out = model(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        attention_mask=batch["attention_mask"],
        images=batch.get("images"),
        image_features=batch.get("image_features"),
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


def decode_slots(
    model: Any,
    cache: SlotCache,
    start: int,
    stop: int,
    end: int,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    live: torch.Tensor,
    types: torch.Tensor,
) -> torch.Tensor:
    """One language token for each slot in [start, stop), written at the slot's own column
    `cache.index`, attending to columns [0, end); returns logits (R, V).

    tokens, positions, live (S,) on the device: each slot's last token, its last position, and 1
    for an occupied slot (a free one keeps index and position 0). types (S, 1): zeros on the host.
    Only `cache.mask` (the new column) and the keys and values at `cache.index` are written, so a
    call that fails can be made again; the caller advances `cache.index` and `positions` by `live`
    once it succeeded. `cache_start` is nominal (end - 1 > 0: a continuation, no image).
    """
    index, mask = cache.index[start:stop], cache.mask[start:stop]
    mask.scatter_(1, index[:, None], True)  # each slot also attends to the column it writes now
    out = model(
        input_ids=tokens[start:stop, None],
        token_type_ids=types[start:stop],
        position_ids=(positions[start:stop] + live[start:stop])[:, None],
        kv_cache=cache.decode_views(start, stop, end),
        cache_start=end - 1,
    )
    return out.logits[:, -1]
