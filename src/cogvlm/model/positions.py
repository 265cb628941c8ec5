"""From token types to what the decoder needs: position ids, expert routing, attention masks.

Token types are made once by prompts.py: 0 for language tokens, 1 for the image span
(boi, patches, eoi). Everything here is derived from them, as the official code does.
"""

from __future__ import annotations

import torch

from ..config import LANGUAGE_TOKEN_TYPE as LANG
from ..config import VISION_TOKEN_TYPE as VIS


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) -> (B, T) int64 positions: boi, eoi and text advance by one, all patches share one.

    For `[bos, boi, patch * P, eoi, text...]` this gives 0, 1, 2 ... 2, 3, 4, ...
    Padding (mask 0) does not advance, so in a left-padded row the first real token gets
    position 1, not 0: the official quirk, kept for exact outputs.
    """
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[attention_mask == 0] = -1
    # boi / eoi: an image token next to a language token (or at either end) counts as language.
    edge = torch.zeros_like(tmp, dtype=torch.bool)
    edge[:, 1:] |= (tmp[:, 1:] == VIS) & (tmp[:, :-1] == LANG)
    edge[:, 0] |= tmp[:, 0] == VIS
    edge[:, :-1] |= (tmp[:, :-1] == VIS) & (tmp[:, 1:] == LANG)
    edge[:, -1] |= tmp[:, -1] == VIS
    tmp[edge] = LANG
    step = torch.zeros_like(tmp)
    step[:, 1:] = ((tmp[:, 1:] == LANG) | ((tmp[:, 1:] == VIS) & (tmp[:, :-1] == LANG))).long()
    return step.cumsum(dim=-1)


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool: tokens routed to the vision experts, or None when there are none.

    A token is a vision token when it and the next token are image-typed: boi and the
    patches use the vision experts, eoi and all text the language experts. One token alone
    (a decode step) never is, so it is answered without reading the types (no host sync).
    """
    if token_type_ids.shape[1] < 2:
        return None
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VIS) & (token_type_ids[:, 1:] == VIS)
    return mask if bool(mask.any()) else None


def attention_mask_4d(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The SDPA mask for T new queries after `past` cached keys: (mask (B, 1, T, past + T), is_causal).

    Unpadded inputs take SDPA's own causal path (or no mask for one query), as the official code
    does; padded ones get an explicit boolean mask. A padding query may attend to itself only,
    so its row is never empty (no NaN); its output is never used.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if q_len == 1:
            return None, False
        if past == 0:
            return None, True
    total = past + q_len
    causal = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past)
    self_only = torch.zeros_like(causal)
    self_only[torch.arange(q_len, device=device), torch.arange(past, total, device=device)] = True
    keys = attention_mask if attention_mask is not None else torch.ones(1, total, dtype=torch.bool, device=device)
    keys = keys[:, None, None, :total].to(device=device, dtype=torch.bool)  # (B, 1, 1, S)
    return (causal & keys) | self_only, False
