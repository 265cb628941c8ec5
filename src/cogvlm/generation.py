"""Token generation: a preallocated KV cache, prefill, decode one token, sample.

The cache holds (B, Hkv, S_max, K) keys and values per layer, written at explicit positions; a
step never concatenates over it. Batches are left-padded (pad id, type 0, mask 0); rows that
finish are dropped from the batch so they stop costing compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .config import LANGUAGE_TOKEN_TYPE
from .errors import SettingsError
from .loading.placement import execution_device
from .model.positions import build_position_ids


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings of one request; greedy by default, as the official demos."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    def replace(self, **changes: Any) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)


class KVCache:
    """Per-layer (keys, values), each (B, Hkv, S_max, K), in the model's dtype and device.

    Each layer's cache lives on that layer's execution device (device maps, offloaded layers).
    The model gets this object, not its list: accelerate's device hooks copy lists of tensors
    to their device, which would send the writes to a copy; an object they leave alone.
    """

    def __init__(self, model: Any, batch: int, max_len: int) -> None:
        cfg = model.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # grouped-query: the KV heads only
        dtype = model.model.embed_tokens.weight.dtype  # quantised weights do not carry the compute dtype
        self.layers = []
        for layer in model.model.layers:
            device = execution_device(layer.input_layernorm)
            self.layers.append(
                (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            )

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.layers = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.layers]


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
