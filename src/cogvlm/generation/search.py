"""Beam search over the same prefill / decode_one_token steps and KV cache as sampling.

Scored as transformers' beam search (5.x), so the exported LLaMA finds the same beams on
text-only prompts:
- every step ranks all continuations of a row's beams by summed log-probability and keeps the
  best K = max(2, 1 + number of eos ids) * num_beams; of those that did not just end, the best
  num_beams run on;
- one of the best num_beams that ends (an eos id, or the max_new_tokens-th token) becomes a
  hypothesis scored sum_logprob / n ** length_penalty, n the new tokens with the eos and without
  the prompt; a row keeps its num_beams best hypotheses;
- a row is done when early_stopping is True and it holds num_beams hypotheses, or when its best
  running beam can no longer beat its worst hypothesis, judged at the current length (at
  max_new_tokens for early_stopping "never" with length_penalty > 0). Done rows leave the batch.

The prompt is prefilled once per row (images included); its cache rows are then repeated
num_beams times and gathered by each step's chosen beams, so the image tokens carry through.
Shapes: B rows, L rows still searched, N beams, K candidates, V vocabulary, M max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import SettingsError
from ..loading.placement import execution_device
from .cache import KVCache
from .step import decode_one_token, prefill

_NEG = -1.0e9  # transformers' "impossible" score: a beam or hypothesis slot that must not be chosen


@dataclass(frozen=True)
class BeamSettings:
    """Beam-search settings, named and defaulted as transformers' generate names them."""

    num_beams: int
    max_new_tokens: int
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    early_stopping: bool | str = False  # True, False or "never", as transformers
    num_return_sequences: int = 1  # the best hypotheses returned per row

    def __post_init__(self) -> None:
        checks = [
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.early_stopping in (True, False, "never"), "early_stopping must be True, False or 'never'"),
            (
                1 <= self.num_return_sequences <= self.num_beams,
                "num_return_sequences must be between 1 and num_beams",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)


@dataclass(frozen=True)
class Hypothesis:
    """One finished beam: its new tokens (the eos included when it ended on one) and its score."""

    tokens: list[int]
    score: float


class _Beams:
    """The search state of all B rows: running beams and kept hypotheses, (B, N[, M])."""

    def __init__(self, rows: int, beams: int, steps: int, device: torch.device) -> None:
        self.tokens = torch.zeros(rows, beams, steps, dtype=torch.long, device=device)  # running beams
        self.scores = torch.full((rows, beams), _NEG, device=device)  # summed log-probabilities
        self.scores[:, 0] = 0.0  # the first step expands one beam, not N copies of it
        self.done_tokens = torch.zeros_like(self.tokens)  # hypotheses, best first
        self.done_scores = torch.full((rows, beams), _NEG, device=device)
        self.done_lengths = torch.zeros(rows, beams, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, beams, dtype=torch.bool, device=device)  # slot holds a hypothesis


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (L, K[, M]) at index (L, N) along dim 1 -> (L, N[, M])."""
    if x.dim() == 3:
        index = index[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, index)


def _select_cache(cache: KVCache, index: torch.Tensor) -> None:
    """Keep the cache rows at `index` (L N,), in that order: repeats, reorders and drops beams.
    One layer at a time, so the copy costs one layer's memory, not the cache's."""
    for i, (k, v) in enumerate(cache.layers):
        cache.layers[i] = (k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))


@torch.no_grad()
def beam_search(
    model: Any,
    batch: dict[str, Any],
    settings: BeamSettings,
    eos_token_id: int | Sequence[int] | None,
) -> list[list[Hypothesis]]:
    """The num_return_sequences best hypotheses of each row of a left-padded batch, best first.

    Args:
        model: a CogVLMForCausalLM.
        batch: input_ids, token_type_ids, attention_mask (B, T) and images, as `prompts.collate`
            builds them.
        settings: beams, length penalty, early stopping, number returned.
        eos_token_id: the id or ids that end a hypothesis (None: only max_new_tokens does).
    Returns:
        per row, `settings.num_return_sequences` hypotheses sorted by score.
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    device = execution_device(model.model.embed_tokens)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    b, t = batch["input_ids"].shape
    n, steps, penalty = settings.num_beams, settings.max_new_tokens, settings.length_penalty
    width = max(2, 1 + len(eos)) * n  # K: enough candidates that N survive even if N of them end
    top_n = torch.arange(width, device=device) < n  # only the best N candidates may become hypotheses
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)

    cache = KVCache(model, b, t + steps)
    logits, positions = prefill(model, batch, cache)  # (B, V), (B, T)
    beams = torch.arange(b, device=device).repeat_interleave(n)  # (B N,) each prompt's N beams
    _select_cache(cache, beams)
    logits, positions = logits[beams], positions[beams, -1]
    mask = torch.zeros(b * n, t + steps, dtype=torch.long, device=device)
    mask[:, :t] = batch["attention_mask"][beams]

    state = _Beams(b, n, steps, device)
    live = torch.arange(b, device=device)  # the rows still searched, in cache order
    for step in range(steps):
        length = step + 1  # new tokens once this step's token is chosen
        rows = len(live)
        logprobs = logits.float().log_softmax(-1).to(device)  # (L N, V)
        vocab = logprobs.shape[-1]
        total = (logprobs.view(rows, n, vocab) + state.scores[live][:, :, None]).view(rows, n * vocab)
        top, index = total.topk(width)  # (L, K), best first
        parent, token = index // vocab, index % vocab
        tokens = _gather(state.tokens[live], parent)  # (L, K, M)
        tokens[:, :, step] = token
        ended = torch.isin(token, eos_ids) | (length >= steps)  # (L, K)

        # The best N candidates that did not end run on.
        running = top + ended.float() * _NEG
        keep = running.topk(n).indices  # (L, N)
        state.tokens[live], state.scores[live] = _gather(tokens, keep), _gather(running, keep)
        parent = _gather(parent, keep)

        # Ended candidates among the best N become hypotheses (a done row has left the batch).
        finished = ended & top_n  # (L, K)
        scores = torch.where(finished, top / (length**penalty), _NEG)
        pool = torch.cat((state.done_scores[live], scores), 1)  # (L, N + K): kept and new
        merged = pool.topk(n).indices  # (L, N)
        state.done_scores[live] = _gather(pool, merged)
        state.done_tokens[live] = _gather(torch.cat((state.done_tokens[live], tokens), 1), merged)
        lengths = torch.full_like(token, length)
        state.done_lengths[live] = _gather(torch.cat((state.done_lengths[live], lengths), 1), merged)
        state.done[live] = _gather(torch.cat((state.done[live], finished), 1), merged)

        # A row searches on while its best running beam may still beat its worst hypothesis, and,
        # with early_stopping True, until it holds N hypotheses.
        reach = steps if settings.early_stopping == "never" and penalty > 0 else length
        best = state.scores[live][:, 0] / (reach**penalty)  # running beams are sorted, best first
        worst = torch.where(state.done[live], state.done_scores[live].min(-1, keepdim=True).values, _NEG)
        improvable = (best[:, None] > worst).any(-1)  # (L,); any slot without a hypothesis can still fill
        searching = improvable & ~(state.done[live].all(-1) & (settings.early_stopping is True))
        if length >= steps or not bool(searching.any()):
            break

        # The next step: the surviving rows' chosen beams, their caches gathered to match.
        stay = searching.nonzero().squeeze(1)  # (L',)
        select = (stay[:, None] * n + parent[stay]).reshape(-1)  # (L' N,) rows of the cache
        _select_cache(cache, select)
        mask, positions, live = mask[select], positions[select] + 1, live[stay]
        cur = t + step
        mask[:, cur] = 1
        last = state.tokens[live][:, :, step].reshape(-1)  # (L' N,)
        logits = decode_one_token(model, last, positions, mask[:, : cur + 1], cache, cur)

    return [
        [
            Hypothesis(state.done_tokens[r, j, : state.done_lengths[r, j]].tolist(), float(state.done_scores[r, j]))
            for j in range(settings.num_return_sequences)
        ]
        for r in range(b)
    ]
