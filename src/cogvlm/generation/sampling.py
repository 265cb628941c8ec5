"""Choosing the next token from logits: repetition penalty, greedy, temperature, top-k, top-p."""

from __future__ import annotations

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
