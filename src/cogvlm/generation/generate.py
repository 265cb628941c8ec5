"""The drop-in `model.generate`, as transformers returns it."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..errors import SettingsError
from .config import GenerationConfig
from .decoder import BatchDecoder

_GENERATE_KEYS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"stop"}


def generate_sequences(
    model: Any,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    images: Any = None,
    max_length: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    num_beams: int = 1,
    **kwargs: Any,
) -> torch.Tensor:
    """The drop-in `model.generate`: prompt + new tokens (B, T + N); rows that ended early are
    padded with the pad id, as transformers does. Without max_length / max_new_tokens the
    transformers default applies (max_length 20); without eos_token_id, every id of
    config.eos_token_ids ends a row (CogVLM2: <|end_of_text|> and <|eot_id|>)."""
    unknown = set(kwargs) - _GENERATE_KEYS - {"use_cache"}
    if unknown:
        raise TypeError(f"generate() got unexpected argument(s): {', '.join(sorted(unknown))}")
    if num_beams != 1:
        raise SettingsError("beam search is not supported (num_beams must be 1)")
    kwargs.pop("use_cache", None)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    t = input_ids.shape[1]
    if "max_new_tokens" not in kwargs:
        kwargs["max_new_tokens"] = max((max_length or 20) - t, 1)
    config = GenerationConfig(**kwargs)
    eos = model.config.eos_token_ids if eos_token_id is None else eos_token_id
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "images": images,
    }
    decoder = BatchDecoder(model, batch, [config] * input_ids.shape[0], eos)
    for _ in decoder:
        pass
    n = max(len(tokens) for tokens in decoder.tokens)
    new = torch.full((input_ids.shape[0], n), pad, dtype=input_ids.dtype)
    for r, tokens in enumerate(decoder.tokens):
        new[r, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat((input_ids.cpu(), new), dim=1)
