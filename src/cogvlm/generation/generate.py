"""The drop-in `model.generate`, as transformers returns it: greedy, sampling or beam search."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from ..errors import SettingsError
from .config import GenerationConfig
from .decoder import BatchDecoder
from .sampling import row_seeds
from .search import BeamSettings, beam_search

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
    length_penalty: float | None = 1.0,
    early_stopping: bool | str | None = False,
    num_return_sequences: int = 1,
    **kwargs: Any,
) -> torch.Tensor:
    """The drop-in `model.generate`: prompt + new tokens (B, T + N) on input_ids' device, in its
    dtype; rows that ended early are padded with the pad id, as transformers does. Without
    max_length / max_new_tokens the transformers default applies (max_length 20); without
    eos_token_id, every id of config.eos_token_ids ends a row (CogVLM2: <|end_of_text|> and
    <|eot_id|>).

    Sampling (do_sample=True) with a seed: row i draws with seed + i, exactly what it would draw
    alone with seed + i (`sampling.row_seeds`); so `input_ids.repeat(4, 1)` gives four different,
    reproducible samples, and row 0 is the call without the batch.

    Beam search (num_beams > 1, do_sample=False): `search.beam_search`, which finds the beams
    transformers' beam search finds (length_penalty, early_stopping True / False / "never" as
    there); returns B * num_return_sequences rows, each prompt's best hypothesis first. Beam
    sampling and a repetition penalty with beams are not supported. Where transformers' beam
    search fills ended rows with the eos id (pad id 0), these are filled with the pad id."""
    unknown = set(kwargs) - _GENERATE_KEYS - {"use_cache"}
    if unknown:
        raise TypeError(f"generate() got unexpected argument(s): {', '.join(sorted(unknown))}")
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
    if num_beams > 1:
        if config.do_sample or config.repetition_penalty != 1.0:
            raise SettingsError("beam search takes neither do_sample nor repetition_penalty (pass do_sample=False)")
        settings = BeamSettings(
            num_beams=num_beams,
            max_new_tokens=config.max_new_tokens,
            length_penalty=1.0 if length_penalty is None else length_penalty,
            early_stopping=False if early_stopping is None else early_stopping,
            num_return_sequences=num_return_sequences,
        )
        found = beam_search(model, batch, settings, eos)
        rows = [h.tokens for hypotheses in found for h in hypotheses]
        return _sequences(input_ids.repeat_interleave(num_return_sequences, 0), rows, pad)
    if num_beams != 1 or num_return_sequences != 1:
        raise SettingsError(
            "num_beams must be >= 1, and num_return_sequences > 1 needs num_beams >= it "
            "(for several samples, repeat the rows: row i samples with seed + i)"
        )
    decoder = BatchDecoder(model, batch, row_seeds([config] * input_ids.shape[0]), eos)
    for _ in decoder:
        pass
    return _sequences(input_ids, decoder.tokens, pad)


def _sequences(prompt: torch.Tensor, rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """prompt (R, T) + each row's new tokens, right-padded with `pad`: (R, T + N), on prompt's device."""
    n = max(len(tokens) for tokens in rows)
    new = torch.full((len(rows), n), pad, dtype=prompt.dtype)
    for r, tokens in enumerate(rows):
        new[r, : len(tokens)] = torch.tensor(tokens, dtype=prompt.dtype)
    return torch.cat((prompt, new.to(prompt.device)), dim=1)
