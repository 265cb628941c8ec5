"""Prefill the prompt, decode one token: the two model calls generation is made of.

`decode_one_token` writes every row at one shared column (a `KVCache`); `decode_slots` writes each
row at its own slot's column (a `SlotCache`) and reads nothing back to the host: the positions,
the write index and the mask stay on the device, and the token types of a decode step (all
language) are a host tensor, so the network's count of image tokens is a host operation. That is
what lets `DecodeState` replay the step as a CUDA graph. `prefill_shared` prefills a batch whose
rows open with [BOS, image] computing each distinct prefix once (a Pipeline's batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
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


@dataclass(frozen=True)
class Prefix:
    """A row's [BOS, image]: its ids (P,) and its image's features (G + 2, D)."""

    ids: torch.Tensor
    features: torch.Tensor

    def same(self, other: "Prefix") -> bool:
        """Whether the two give the same keys and values (equal ids, bit-equal features)."""
        return torch.equal(self.ids, other.ids) and torch.equal(self.features, other.features)


@dataclass(frozen=True)
class ImagePrefix:
    """Rows of a left-padded batch that each open with [BOS, image] (P tokens) and go on with text:
    `order` lists the rows with a prefix of their own (no row before them has the same) first,
    then the rows that share one; `source[i]` is the place in `order` of the row whose prefix
    order[i] takes; `prefixes[i]` is order[i]'s."""

    length: int
    order: list[int]
    source: list[int]
    prefixes: list[Prefix]

    @property
    def distinct(self) -> int:
        """How many different prefixes the rows hold (the first `distinct` rows of `order`)."""
        return len(set(self.source))


def image_prefix(batch: dict[str, Any]) -> ImagePrefix | None:
    """The plan for `prefill_shared`, or None when a row is text only, holds an image elsewhere
    than right after its first token, or is all prefix (the batch is then prefilled whole)."""
    features = batch.get("image_features")
    types, mask, ids = batch["token_type_ids"], batch["attention_mask"], batch["input_ids"]
    n, t = ids.shape
    if features is None or features.shape[0] != n:
        return None
    g = features.shape[1]  # boi, patches, eoi
    lengths = mask.sum(1)
    pads = t - lengths  # (n,)
    span = pads[:, None] + torch.arange(g + 1, device=pads.device)  # (n, P) each row's first P columns
    left_padded = bool((mask.bool() == (torch.arange(t, device=pads.device) >= pads[:, None])).all())
    prefix_types = types.gather(1, span.clamp(max=t - 1))  # (n, P)
    expected = torch.full((g + 1,), VISION_TOKEN_TYPE, device=types.device)
    expected[0] = LANGUAGE_TOKEN_TYPE
    if not (
        left_padded
        and bool((lengths > g + 1).all())
        and bool((prefix_types == expected).all())
        and bool(((types == VISION_TOKEN_TYPE).sum(1) == g).all())
    ):
        return None
    prefix_ids = ids.gather(1, span)  # (n, P)
    prefixes = [Prefix(prefix_ids[r], features[r]) for r in range(n)]
    firsts: list[int] = []
    owner: list[int] = []  # each row's first row with the same prefix
    for r in range(n):
        first = next((f for f in firsts if prefixes[f].same(prefixes[r])), None)
        if first is None:
            firsts.append(r)
        owner.append(r if first is None else first)
    order = firsts + [r for r in range(n) if owner[r] != r]
    place = {r: i for i, r in enumerate(order)}
    return ImagePrefix(g + 1, order, [place[owner[r]] for r in order], [prefixes[r] for r in order])


def prefill_shared(
    model: Any, batch: dict[str, Any], plan: ImagePrefix, cache: SlotCache, start: int, source: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill the rows of `batch` into slots [start, start + n) in `plan.order`, each distinct
    [BOS, image] prefix computed once: the prefixes, unpadded, into the first slots' columns [0, P)
    (`source`, for one prefix: the slot whose columns [0, P) hold it already, `start` itself or
    another, copied); copies of them into the slots of the rows that share one; then every row's
    text after it, in columns [P, T), left-padded there (a row's padding sits between its prefix
    and its text). Positions are each row's own, as when it runs alone. Returns, in slot order, the
    logits of the last position (n, V), position ids (n, T - P) of the text, and the mask of
    columns (n, T)."""
    p, order = plan.length, torch.tensor(plan.order, device=batch["input_ids"].device)
    ids, types, mask = (batch[k].index_select(0, order) for k in ("input_ids", "token_type_ids", "attention_mask"))
    n, t = ids.shape
    u = plan.distinct
    pads = t - mask.sum(1)  # (n,)
    span = pads[:u, None] + torch.arange(p, device=ids.device)  # (u, P)
    prefix_types = types[:u].gather(1, span)
    prefix_positions = build_position_ids(prefix_types)  # (u, P), the same in every row
    if source is None:
        model(
            input_ids=ids[:u].gather(1, span),
            token_type_ids=prefix_types,
            image_features=batch["image_features"].index_select(0, order[:u].to(batch["image_features"].device)),
            position_ids=prefix_positions,
            kv_cache=cache.rows(start, start + u),
            cache_start=0,
            logits_to_keep=1,
        )
    elif source != start:
        _copy_prefix(cache, torch.tensor([source]), start, p)
    if u < n:  # the sharing rows take a copy of their prefix's keys and values
        _copy_prefix(cache, torch.tensor(plan.source[u:]) + start, start + u, p)
    # Row r's text is at columns [pads[r] + P, T) of the batch: at [P + pads[r], T) in the slot,
    # i.e. the batch's own columns [P, T) with the first pads[r] of them held out (by the mask:
    # what they hold is never attended to).
    text = mask[:, : t - p]  # (n, T - P): 1 where a text token sits
    text_positions = prefix_positions[:1, -1:] + text.cumsum(1)  # (n, T - P)
    columns = torch.cat((torch.ones_like(mask[:, :p]), text), dim=1)  # (n, T)
    out = model(
        input_ids=ids[:, p:],
        token_type_ids=torch.zeros_like(text),
        attention_mask=columns,
        position_ids=text_positions,
        kv_cache=cache.rows(start, start + n),
        cache_start=p,
        logits_to_keep=1,
    )
    return out.logits[:, -1], text_positions, columns


def _copy_prefix(cache: SlotCache, sources: torch.Tensor, first: int, p: int) -> None:
    """Slots [first, first + len(sources)) take the keys and values in columns [0, p) of `sources`."""
    for keys, values in cache.layers:
        for stored in (keys, values):
            stored[first : first + len(sources), :, :p] = stored[:, :, :p][sources.to(stored.device)]


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
    for an occupied slot (a free one keeps position 0, and the index `SlotCache.free` gave it). types
    (S, 1): zeros on the host.
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
