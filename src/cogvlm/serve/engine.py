"""Continuous batching: one worker thread runs the model, and a new request joins the running
batch at the next decode step instead of waiting for the batch to end.

A newcomer is prefilled alone, in its own KV cache, so its prompt is computed exactly as when
it runs alone; its first token comes from that prefill. Its keys and values are then moved into
the running left-padded cache so that they end at the shared write index `cur`, with mask 0
before them; when its prompt is longer than `cur`, the running rows are shifted right. Each row
keeps the position ids of its own prefill, so a joined row decodes as it would alone. Rows
leave the batch when they finish, are cancelled or run out of time.

The event loop only enqueues work and reads events: `submit` and `cancel` are cheap and never
wait for the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation import GenerationConfig, KVCache, decode_one_token, prefill, sample
from ..loading.placement import execution_device
from ..prompts import collate
from ..streaming import TextStream

log = logging.getLogger("cogvlm.serve")

#: Free cache columns allocated ahead at least, so the cache is not copied at every step.
MIN_ROOM = 64


@dataclass(frozen=True)
class EngineSettings:
    """How many requests decode together, how many may wait, and how long one may take."""

    max_batch: int = 8
    max_queue: int = 32
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a text piece, the end, or a failure.

    kind: "text" (text), "done" (finish_reason "stop" or "length"), "error" (error: "timeout",
    "internal" or "shutdown"), or "cancelled" (put by the server when the client left).
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


class QueueFull(Exception):
    """Every batch slot is taken and the waiting queue is full."""


@dataclass(eq=False)
class Job:
    """One request inside the engine: its inputs, settings, progress, and its event queue."""

    sample: dict[str, Any]
    config: GenerationConfig
    request_id: str
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.sample["input_ids"])

    def deliver(self, event: Event) -> None:
        """Put an event on the queue from the worker thread (a closed loop has no listener)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class RunningBatch:
    """The rows decoding together: a left-padded KV cache (B, H, S, K) per layer, attention mask
    (B, S), each row's last position (B,) and last token (B,), and the write index `cur`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.jobs: list[Job] = []
        self.cache: KVCache | None = None
        device = execution_device(model.model.embed_tokens)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.last = torch.zeros(0, dtype=torch.long, device=device)
        self.cur = 0

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else self.cache.layers[0][0].shape[2]

    def add(self, job: Job, cache: KVCache, length: int, position: int, token: int) -> None:
        """Append a row prefilled alone: its cache holds `length` prompt columns."""
        self._relayout((job, cache, length))
        self.jobs.append(job)
        self.positions = torch.cat((self.positions, self.positions.new_tensor([position])))
        self.last = torch.cat((self.last, self.last.new_tensor([token])))

    def step(self) -> torch.Tensor:
        """Decode the last token of every row; returns logits (B, V)."""
        if self.cur == self.capacity:
            self._relayout()
        self.mask[:, self.cur] = 1
        self.positions = self.positions + 1
        logits = decode_one_token(
            self.model, self.last, self.positions, self.mask[:, : self.cur + 1], self.cache, self.cur
        )
        self.cur += 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (by index), in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.jobs = [self.jobs[i] for i in rows]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        if self.jobs:
            self.cache.keep(index)
        else:
            self.cache, self.cur = None, 0

    def _relayout(self, row: tuple[Job, KVCache, int] | None = None) -> None:
        """Copy into a fresh cache: drop the leftmost columns no row uses, right-align the rows
        to the longest prompt (`row`'s, when it is longer), leave room to grow, append `row`."""
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.cur
        span = self.cur - start  # columns the running rows still use
        length = row[2] if row else 0
        cur = max(span, length)
        jobs = self.jobs + ([row[0]] if row else [])
        remaining = max(j.config.max_new_tokens - len(j.tokens) for j in jobs)  # >= 1: all unfinished
        capacity = cur + min(max(MIN_ROOM, cur // 2), remaining)
        n = len(self.jobs)
        fresh = KVCache(self.model, len(jobs), capacity)
        mask = torch.zeros(
            len(jobs), capacity, dtype=torch.long, device=execution_device(self.model.model.embed_tokens)
        )
        if n:
            mask[:n, cur - span : cur] = self.mask[:, start : self.cur]
            for (new_k, new_v), (old_k, old_v) in zip(fresh.layers, self.cache.layers):
                new_k[:n, :, cur - span : cur] = old_k[:, :, start : self.cur]
                new_v[:n, :, cur - span : cur] = old_v[:, :, start : self.cur]
        if row:
            mask[n, cur - length : cur] = 1
            for (new_k, new_v), (row_k, row_v) in zip(fresh.layers, row[1].layers):
                new_k[n, :, cur - length : cur] = row_k[0, :, :length]
                new_v[n, :, cur - length : cur] = row_v[0, :, :length]
        self.cache, self.mask, self.cur = fresh, mask, cur


class Engine:
    """The model's only user: a worker thread that admits waiting requests into the running
    batch, decodes one step for all of them, and sends each its text as it comes."""

    def __init__(self, pipeline: Any, settings: EngineSettings = EngineSettings()) -> None:
        self.model, self.tokenizer = pipeline.model, pipeline.tokenizer
        self.settings = settings
        eos = self.tokenizer.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or ())
        self._pending: deque[Job] = deque()
        self._admitted: list[Job] = []  # taken from the queue and not yet done: the slots in use
        self._batch = RunningBatch(self.model)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cogvlm-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker; requests still waiting or running get a "shutdown" error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, int]:
        return {"running": len(self._admitted), "waiting": len(self._pending)}

    def submit(self, sample: dict[str, Any], config: GenerationConfig, request_id: str) -> Job:
        """Queue a built sample (call from the event loop); its events arrive on `job.events`.
        Raises QueueFull when the free batch slots and the waiting queue are all taken."""
        job = Job(sample, config, request_id, time.monotonic() + self.settings.timeout_s, asyncio.get_running_loop())
        with self._wake:
            free = self.settings.max_batch - len(self._admitted)
            if self._closed or len(self._pending) >= free + self.settings.max_queue:
                raise QueueFull
            self._pending.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Forget a request: a waiting one leaves the queue now, a running one at the next step."""
        with self._wake:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)

    # ---- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._batch.jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                room = self.settings.max_batch - len(self._batch.jobs)
                newcomers = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self._admitted = self._batch.jobs + newcomers
            try:
                with torch.inference_mode():
                    self._step(newcomers)
            except Exception:  # a model failure fails the requests in it, never the worker
                jobs = self._batch.jobs + newcomers
                log.exception("model step failed; requests %s", ", ".join(j.request_id for j in jobs))
                self._fail(jobs, "internal")
                self._batch = RunningBatch(self.model)
            with self._wake:
                self._admitted = list(self._batch.jobs)
        with self._wake:
            self._fail(self._batch.jobs + list(self._pending), "shutdown")
            self._pending.clear()

    def _step(self, newcomers: list[Job]) -> None:
        now = time.monotonic()
        for job in newcomers:
            if job.cancelled:
                continue
            if now > job.deadline:
                self._fail([job], "timeout")
                continue
            self._join(job)
        batch = self._batch
        for job in batch.jobs:
            if not job.cancelled and now > job.deadline:
                self._fail([job], "timeout")
        self._drop_done()
        if not batch.jobs:
            return
        logits = batch.step()
        for job, token in zip(batch.jobs, self._pick(logits, batch.jobs)):
            self._accept(job, token)
        batch.last = batch.last.new_tensor([job.tokens[-1] for job in batch.jobs])
        self._drop_done()

    def _join(self, job: Job) -> None:
        """Prefill alone, take the first token, and add the row to the running batch."""
        sample = job.sample
        inputs = collate([sample], pad_token_id=self.tokenizer.pad_token_id)
        device, dtype = execution_device(self.model.model.embed_tokens), self.model.dtype
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        inputs["images"] = [[img.to(device, dtype) for img in sample["images"] or []]]
        length = inputs["input_ids"].shape[1]
        cache = KVCache(self.model, 1, length)
        logits, positions = prefill(self.model, inputs, cache)
        job.stream = TextStream(self.tokenizer, job.config.stop)
        if job.config.seed is not None:
            job.generator = torch.Generator(device=device).manual_seed(job.config.seed)
        self._accept(job, self._pick(logits, [job])[0])
        if not job.finished:
            self._batch.add(job, cache, length, int(positions[0, -1]), job.tokens[-1])

    def _pick(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """Next token of each row: greedy rows at once, the others through `sample`."""
        if all(not j.config.do_sample and j.config.repetition_penalty == 1.0 for j in jobs):
            return logits.argmax(-1).tolist()
        picked = []
        for row, job in zip(logits, jobs):
            previous = torch.tensor(job.sample["input_ids"].tolist() + job.tokens, device=row.device)
            picked.append(sample(row, job.config, previous, job.generator))
        return picked

    def _accept(self, job: Job, token: int) -> None:
        """Record a token, send the text it completes, and finish the job when it is done."""
        job.tokens.append(token)
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            piece = job.stream.push(token)
            if piece:
                job.deliver(Event("text", text=piece))
            if job.stream.stopped:
                reason = "stop"
        if reason is None and len(job.tokens) >= job.config.max_new_tokens:
            reason = "length"
        if reason is not None:
            rest = job.stream.finish()
            if rest:
                job.deliver(Event("text", text=rest))
            job.finished = True
            job.deliver(Event("done", finish_reason=reason))

    def _fail(self, jobs: list[Job], error: str) -> None:
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.deliver(Event("error", error=error))

    def _drop_done(self) -> None:
        batch = self._batch
        keep = [i for i, job in enumerate(batch.jobs) if not (job.finished or job.cancelled)]
        if len(keep) < len(batch.jobs):
            batch.keep(keep)
