"""The decode loop over a left-padded batch: rows finish and leave the batch."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ..loading.placement import execution_device
from .cache import KVCache
from .config import GenerationConfig
from .sampling import sample
from .step import decode_one_token, prefill


class BatchDecoder:
    """Iterate decoding steps over a left-padded batch; each step yields {row: token}.

    Rows finish at any of the eos ids, at their max_new_tokens, or when the caller calls
    `finish(row)` (a stop string, a cancelled request); finished rows leave the batch before the
    next step.
    """

    def __init__(
        self,
        model: Any,
        batch: dict[str, Any],
        configs: Sequence[GenerationConfig],
        eos_token_id: int | Sequence[int] | None,
    ) -> None:
        self.model, self.configs = model, list(configs)
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        device = execution_device(model.model.embed_tokens)
        self.batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        b, t = self.batch["input_ids"].shape
        self.max_len = t + max(c.max_new_tokens for c in self.configs)
        self.generators = [self._generator(c, device) for c in self.configs]
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self._finished: set[int] = set()

    @staticmethod
    def _generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
        if not config.do_sample or config.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(config.seed)

    def finish(self, row: int) -> None:
        self._finished.add(row)

    def _pick(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        if all(not self.configs[r].do_sample and self.configs[r].repetition_penalty == 1.0 for r in rows):
            return logits.argmax(-1).tolist()  # the common greedy case, vectorised
        picked = []
        for i, r in enumerate(rows):
            previous = torch.cat(
                (
                    self.batch["input_ids"][r].new_tensor(self._prompt_ids(r)),
                    self.batch["input_ids"][r].new_tensor(self.tokens[r]),
                )
            )
            picked.append(sample(logits[i], self.configs[r], previous.to(logits.device), self.generators[r]))
        return picked

    def _prompt_ids(self, row: int) -> list[int]:
        ids, mask = self.batch["input_ids"][row], self.batch["attention_mask"][row]
        return ids[mask.bool()].tolist()

    @torch.no_grad()
    def __iter__(self) -> Iterator[dict[int, int]]:
        b, t = self.batch["input_ids"].shape
        cache = KVCache(self.model, b, self.max_len)
        mask = torch.zeros(b, self.max_len, dtype=torch.long, device=execution_device(self.model.model.embed_tokens))
        mask[:, :t] = self.batch["attention_mask"]
        logits, positions = prefill(self.model, self.batch, cache)
        positions = positions[:, -1]
        rows = list(range(b))  # original row of each live batch index
        cur = t
        while rows:
            step = dict(zip(rows, self._pick(logits, rows)))
            yield step
            for r, tok in step.items():
                self.tokens[r].append(tok)
                if tok in self.eos or len(self.tokens[r]) >= self.configs[r].max_new_tokens:
                    self._finished.add(r)
            keep = [i for i, r in enumerate(rows) if r not in self._finished]
            if not keep or cur >= self.max_len:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=mask.device)
                cache.keep(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
            tokens = torch.tensor([self.tokens[r][-1] for r in rows], device=mask.device)
            mask[:, cur] = 1
            positions = positions + 1
            logits = decode_one_token(self.model, tokens, positions, mask[:, : cur + 1], cache, cur)
            cur += 1
