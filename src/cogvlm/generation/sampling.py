"""Choosing the next token from logits: repetition penalty, greedy, temperature, top-k, top-p;
and the seed rule of a sampled batch (`row_seeds`)."""

from __future__ import annotations

from typing import Sequence

import torch

from .config import GenerationConfig


def sample(
    logits: torch.Tensor, config: GenerationConfig, previous: torch.Tensor, generator: torch.Generator | None = None
) -> int:
    """Next token of one row from logits (V,): repetition penalty, then greedy or
    temperature / top-k / top-p sampling (the transformers order)."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and previous.numel():
        seen = logits[previous]
        logits = logits.scatter(
            0, previous, torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        )
    if not config.do_sample:
        return int(logits.argmax())
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= config.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def row_seeds(configs: Sequence[GenerationConfig]) -> list[GenerationConfig]:
    """The seed rule of a batch: row i of a seeded, sampled batch draws with seed + i (modulo
    2**64, the range of torch seeds), so it samples exactly what it would alone with seed + i.
    Rows of one seed differ (four copies of a prompt give four samples) and stay reproducible;
    row 0 keeps the seed, so a batch of one is the request alone. Greedy and unseeded rows are
    returned as they are."""
    return [
        c.replace(seed=(c.seed + i) % 2**64 if i else c.seed) if c.do_sample and c.seed is not None else c
        for i, c in enumerate(configs)
    ]
