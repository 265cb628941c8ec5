"""The decode state that both `BatchDecoder` (the drop-in `generate`, the Pipeline) and the
server's engine drive, and the token picker they share.

`DecodeState` owns one `SlotCache`, reserved once, and the `Row` in each slot. Rows join by
being prefilled straight into free slots (`admit`: the batch's left-padded prompt, or one
newcomer's prompt alone, so it is computed exactly as when it runs alone); each `step` decodes
one token for every occupied slot below the highest one, each row at its own column and
position; a row that ends frees its slot in place (`release`). Nothing is ever re-laid out or
copied for the batch: memory is the cache, reserved once, plus one step's activations. A slot
keeps the [BOS, image] prefix of its row (`held`) after the row ends, so that a newcomer about the
same image is placed there and prefills only its text, or copies it from a running row's slot.

A step reads nothing back to the host (positions, write index and mask are device tensors,
advanced arithmetically by `live`); the one read per step is the picked tokens (`pick_tokens`),
which brings back, in the same transfer, whether each row's logits were finite. On one CUDA
device the step can be replayed as a CUDA graph (`DecodeGraphs`): shapes are static per bucket
of (slots, columns), and every tensor it touches is updated in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch

from ..loading.placement import execution_device
from .cache import SlotCache
from .config import GenerationConfig
from .sampling import sample
from .step import ImagePrefix, Prefix, decode_slots, image_prefix, prefill, prefill_shared

log = logging.getLogger("cogvlm.generation")

#: What `pick_tokens` gives a row instead of a token: its logits held NaN or inf; its sampler raised.
NON_FINITE, SAMPLER_FAILED = -1, -2
#: The fewest columns a CUDA graph attends over (buckets are powers of two from there).
MIN_GRAPH_COLUMNS = 128


@dataclass(eq=False)
class Row:
    """One sequence in a slot: its settings, its prompt's ids (for the repetition penalty), the
    tokens picked so far, its seeded generator, its slot and the columns of it in use."""

    config: GenerationConfig
    prompt: torch.Tensor  # (T,) the prompt's ids, padding left out
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    slot: int = -1
    length: int = 0

    @property
    def greedy(self) -> bool:
        return not self.config.do_sample and self.config.repetition_penalty == 1.0

    def previous(self, device: torch.device) -> torch.Tensor:
        """The prompt's ids and the tokens so far, (T + N,), for the repetition penalty."""
        return torch.cat((self.prompt.to(device), torch.tensor(self.tokens, dtype=torch.long, device=device)))


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A row's own generator when it samples with a seed, so its draws do not depend on the batch."""
    if not config.do_sample or config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def pick_tokens(logits: torch.Tensor, rows: Sequence[Row], check: bool = True) -> list[int]:
    """Next token of each row from its logits (N, V): one argmax for all greedy rows, `sample`
    for the others. With `check`, a row whose logits hold NaN or inf gets NON_FINITE (it is not
    sampled), and a row whose sampler raises gets SAMPLER_FAILED (logged): one row's failure is
    that row's alone. The check comes back in the same device-to-host read as the greedy picks."""
    picks = logits.argmax(-1)
    if check:
        picks = torch.where(torch.isfinite(logits).all(-1), picks, NON_FINITE)
    picked = picks.tolist()  # the one read of the step
    for i, row in enumerate(rows):
        if row.greedy or picked[i] == NON_FINITE:
            continue
        if not check:
            picked[i] = sample(logits[i], row.config, row.previous(logits.device), row.generator)
            continue
        try:
            picked[i] = sample(logits[i], row.config, row.previous(logits.device), row.generator)
        except Exception:
            log.exception("sampling failed for the row in slot %d", row.slot)
            picked[i] = SAMPLER_FAILED
    return picked


class DecodeState:
    """Rows decoding together in the slots of one `SlotCache` of `slots` x `length` tokens.

    Device tensors (S,): `tokens` (each slot's last token, the next step's input), `positions`
    (its last position id), `live` (1 for an occupied slot); `types` (S, 1) zeros on the host.
    `graphs`: replay steps as CUDA graphs (None: when the model and cache are on one CUDA device).
    """

    def __init__(self, model: Any, slots: int, length: int, graphs: bool | None = False) -> None:
        self.model = model
        self.cache = SlotCache(model, slots, length)
        device = self.cache.index.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.live = torch.zeros(slots, dtype=torch.long, device=device)
        self.types = torch.zeros(slots, 1, dtype=torch.long)  # language only, on the host
        # `feed`'s staging buffer: pinned on CUDA, so its copy is asynchronous (the step's one read
        # has finished the previous copy by the time it is written again).
        self._staging = torch.zeros(slots, dtype=torch.long, pin_memory=device.type == "cuda")
        self.rows: list[Row | None] = [None] * slots
        self.held: list[Prefix | None] = [None] * slots  # the [BOS, image] in each slot's first columns
        use_graphs = _one_cuda_device(model, self.cache) if graphs is None else graphs
        self.graphs = DecodeGraphs(self) if use_graphs else None

    @property
    def free(self) -> int:
        return self.rows.count(None)

    def top(self) -> int:
        """One past the highest occupied slot: a step decodes slots [0, top)."""
        return max((s + 1 for s, row in enumerate(self.rows) if row is not None), default=0)

    def admit(self, rows: Sequence[Row], batch: dict[str, Any], share_prefix: bool = False) -> torch.Tensor:
        """Prefill `batch` (len(rows) left-padded rows (n, T), on the model's device, with
        `images`) straight into n consecutive free slots (`_place`); returns the logits of each
        row's last position (n, V). With `share_prefix`, rows that open with [BOS, image] are
        prefilled by `prefill_shared` (each distinct prefix once; none where a free slot kept it,
        copied where a running row's slot holds it; the rows then take the slots in its order).
        A prefill that raises admits nothing: every slot stays as it was (it may have written into
        the free slots it was given; they are still free)."""
        n, t = batch["input_ids"].shape
        if t > self.cache.length:
            raise ValueError(f"a prompt of {t} tokens does not fit slots of {self.cache.length}")
        plan = image_prefix(batch) if share_prefix else None
        start, source = self._place(n, plan)
        if source != start:
            self.held[start : start + n] = [None] * n  # the prefill overwrites them (even one that fails)
        if plan is None:
            order = list(range(n))
            logits, positions = prefill(self.model, batch, self.cache.rows(start, start + n))
            columns = batch["attention_mask"]
        else:
            order = plan.order
            logits, positions, columns = prefill_shared(self.model, batch, plan, self.cache, start, source)
            logits = logits[torch.tensor(order, device=logits.device).argsort()]  # back to the rows' order
            self.held[start : start + n] = plan.prefixes
        self.cache.occupy(start, columns)
        self.positions[start : start + n] = positions[:, -1]
        self.live[start : start + n] = 1
        for i, r in enumerate(order):
            rows[r].slot, rows[r].length = start + i, t
            self.rows[start + i] = rows[r]
        return logits

    def _place(self, n: int, plan: ImagePrefix | None) -> tuple[int, int | None]:
        """The first of n consecutive free slots for a prefill, and a slot holding its one image
        prefix already (None: none does). A slot keeps its row's prefix in columns [0, P) from
        the row's prefill until another prefill takes the slot, the row's end included. One row
        with an image prefix goes where a finished row left the same prefix; else one row goes
        to a free slot below the highest occupied one that keeps none (a step decodes those
        anyway), else to the lowest free one, and takes a copy of its prefix where a running row
        holds it; a batch goes to the lowest n in a row."""
        free = [s for s, row in enumerate(self.rows) if row is None]
        if n > 1:
            start = next((s for s in range(self.cache.slots - n + 1) if not any(self.rows[s : s + n])), None)
            if start is None:
                raise RuntimeError(f"no {n} free slots side by side")
            return start, None
        if not free:
            raise RuntimeError("no free slot")
        prefix = plan.prefixes[0] if plan is not None else None
        holding = [s for s, held in enumerate(self.held) if prefix and held and held.same(prefix)]
        kept = next((s for s in holding if self.rows[s] is None), None)
        if kept is not None:
            return kept, kept
        top = self.top()
        slot = next((s for s in free if s < top and self.held[s] is None), free[0])
        return slot, holding[0] if holding else None

    def feed(self, rows: Sequence[Row]) -> None:
        """Make each row's last picked token its next input: one asynchronous host-to-device copy."""
        top = self.top()
        host = [0] * top
        for row in rows:
            host[row.slot] = row.tokens[-1]
        self._staging[:top] = torch.tensor(host, dtype=torch.long)
        self.tokens[:top].copy_(self._staging[:top], non_blocking=True)

    def step(self, start: int = 0, stop: int | None = None, eager: bool = False) -> torch.Tensor:
        """Decode one token for the slots in [start, stop) (default: every slot up to the highest
        occupied one); returns logits (stop - start, V), a free slot's row being noise. Reads
        nothing back to the host. A step that raises changes no row: it can be made again."""
        stop = self.top() if stop is None else stop
        rows = [row for row in self.rows[start:stop] if row is not None]
        parked = [len(p.ids) for p, row in zip(self.held[start:stop], self.rows[start:stop]) if p and row is None]
        end = max([row.length for row in rows] + parked) + 1  # a free slot keeping P columns writes at P
        if self.graphs is not None and start == 0 and not eager:
            logits = self.graphs.run(stop, end)
        else:
            logits = decode_slots(
                self.model, self.cache, start, stop, end, self.tokens, self.positions, self.live, self.types
            )
        self.cache.index[start:stop].add_(self.live[start:stop])
        self.positions[start:stop].add_(self.live[start:stop])
        for row in rows:
            row.length += 1
        return logits

    def release(self, row: Row, scrub: bool = False) -> None:
        """Free the row's slot in place (`scrub`: zero its keys and values, after NaN or inf). The
        [BOS, image] prefix it holds stays there for a later row with the same (`admit`): the
        slot's steps while free write at the column after it, which that row writes before reading."""
        if scrub:
            self.held[row.slot] = None
        prefix = self.held[row.slot]
        self.cache.free(row.slot, scrub, park=0 if prefix is None else len(prefix.ids))
        self.live[row.slot] = 0
        self.positions[row.slot] = 0
        self.rows[row.slot] = None
        row.slot = -1

    def select(self, logits: torch.Tensor, rows: Sequence[Row], start: int = 0) -> torch.Tensor:
        """The rows of `logits` (one per slot from `start`) that belong to `rows`, in their order."""
        slots = [row.slot - start for row in rows]
        if slots == list(range(len(slots))):
            return logits[: len(slots)]
        return logits.index_select(0, torch.tensor(slots, device=logits.device))


class DecodeGraphs:
    """CUDA graphs of the decode step, one per bucket: slots [0, R) and columns [0, E), R and E
    rounded up to powers of two (E from MIN_GRAPH_COLUMNS) and capped by the cache. A bucket is
    captured at its first use, after one eager warm-up run on a side stream (the step changes
    nothing until committed, so running it twice is harmless); later steps replay it. The graph
    reads the state's own tensors, which are only ever updated in place, and all graphs share one
    memory pool. A capture that fails turns graphs off for good (logged); the step runs eagerly."""

    def __init__(self, state: DecodeState) -> None:
        self.state = state
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        self.pool: Any = None
        self.side: Any = None  # the warm-ups' stream, one for all (cuBLAS keeps a workspace per stream)

    def bucket(self, stop: int, end: int) -> tuple[int, int]:
        cache = self.state.cache
        return min(cache.slots, _power_of_two(stop)), min(cache.length, _power_of_two(max(end, MIN_GRAPH_COLUMNS)))

    def run(self, stop: int, end: int) -> torch.Tensor:
        key = self.bucket(stop, end)
        if key not in self.graphs:
            s = self.state
            step = partial(decode_slots, s.model, s.cache, 0, key[0], key[1], s.tokens, s.positions, s.live, s.types)
            try:
                self.graphs[key] = self.capture(step)
            except Exception:  # e.g. a kernel that cannot be captured (some quantised layers)
                log.warning("capturing a CUDA graph of the decode step failed; decoding eagerly", exc_info=True)
                s.graphs = None
                return step()[:stop]
        replay, logits = self.graphs[key]
        replay()
        return logits[:stop]

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Warm up, capture `step`; returns (replay, its static output)."""
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            step()
        torch.cuda.current_stream().wait_stream(self.side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the server's) may use CUDA while the worker captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = step()
        self.pool = graph.pool()
        return graph.replay, logits


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _one_cuda_device(model: Any, cache: SlotCache) -> bool:
    """CUDA graphs pay off and are safe: one CUDA device holds the embedding and every cache."""
    device = cache.index.device
    return device.type == "cuda" and all(k.device == device for k, _ in cache.layers)


class BatchDecoder:
    """Iterate decoding steps over a left-padded batch; each step yields {row: token}.

    Rows finish at any of the eos ids, at their max_new_tokens, or when the caller calls
    `finish(row)` (a stop string, a cancelled request); a finished row frees its slot before the
    next step. The rows decode in a `DecodeState` of one slot each, as the server's do; `graphs`
    as there (replayed as CUDA graphs; None: when the model and cache are on one CUDA device);
    `share_prefix` as `DecodeState.admit`'s. `state`: decode in this one (every slot free, at
    least B of them, each at least prompt + max_new_tokens long) instead of a new one, so that a
    slot's kept [BOS, image] prefix serves this batch; `self.state` is the one used.
    """

    def __init__(
        self,
        model: Any,
        batch: dict[str, Any],
        configs: Sequence[GenerationConfig],
        eos_token_id: int | Sequence[int] | None,
        graphs: bool | None = False,
        share_prefix: bool = False,
        state: DecodeState | None = None,
    ) -> None:
        self.model, self.configs, self.graphs, self.share_prefix = model, list(configs), graphs, share_prefix
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        device = execution_device(model.model.embed_tokens)
        self.batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        b, t = self.batch["input_ids"].shape
        self.max_len = t + max(c.max_new_tokens for c in self.configs)
        self.generators = [make_generator(c, device) for c in self.configs]
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        self._finished: set[int] = set()
        if state is not None and state.free != state.cache.slots:
            raise ValueError("a state to decode in must have every slot free")
        if state is not None and (state.cache.slots < b or state.cache.length < self.max_len):
            raise ValueError(f"a state for {b} rows of {self.max_len} tokens needs that many slots that long")
        self.state = state

    def finish(self, row: int) -> None:
        self._finished.add(row)

    def _prompt_ids(self, row: int) -> torch.Tensor:
        ids, mask = self.batch["input_ids"][row], self.batch["attention_mask"][row]
        return ids[mask.bool()]

    @torch.no_grad()
    def __iter__(self) -> Iterator[dict[int, int]]:
        b = self.batch["input_ids"].shape[0]
        if self.state is None:
            self.state = DecodeState(self.model, b, self.max_len, graphs=self.graphs)
        state = self.state
        rows = [Row(c, self._prompt_ids(r), self.tokens[r], self.generators[r]) for r, c in enumerate(self.configs)]
        logits = state.admit(rows, self.batch, self.share_prefix)  # (B, V) in the rows' order
        live = list(range(b))  # the batch rows still decoding
        while True:
            picked = pick_tokens(logits, [rows[r] for r in live], check=False)
            step = dict(zip(live, picked))
            yield step
            for r, token in step.items():
                self.tokens[r].append(token)
                if token in self.eos or len(self.tokens[r]) >= self.configs[r].max_new_tokens:
                    self._finished.add(r)
            for r in live:
                if r in self._finished:
                    state.release(rows[r])
            live = [r for r in live if r not in self._finished]
            if not live:
                return
            state.feed([rows[r] for r in live])
            first = min(rows[r].slot for r in live)  # rows that finished below it cost nothing
            logits = state.select(state.step(first), [rows[r] for r in live], start=first)
