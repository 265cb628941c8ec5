"""Continuous batching: one worker thread runs the model, and a new request joins the running
batch at the next decode step instead of waiting for the batch to end.

Memory is reserved once. The engine owns a `DecodeState` (generation.decoder) of `max_batch`
slots, each as long as the context, allocated when it starts. A request is admitted when a slot
is free: what it needs, prompt + max_tokens, always fits one slot, since the app refuses more
than the context (400 context_length_exceeded) and `submit` checks it again. It is prefilled
alone, straight into its slot, so its prompt is computed exactly as when it runs alone; its first
token comes from that prefill (a finished row's slot keeps its [BOS, image] prefix: a request
about the same image, a chat client's next turn, goes there and prefills its text alone; one
about the image of a running row copies the prefix from that row's slot). Then
it decodes with the other rows, each at its own column and position, and when it ends (done,
cancelled, timed out, failed) its slot is freed in place.
Nothing is re-laid out for the batch (an image prefix may be copied from slot to slot, inside
the reserved cache): peak memory is the weights, the slots, and one
prefill's or one step's activations, and the pipeline's `image_cache` (a picture sent again, as
chat clients do with every turn, is not encoded again).

`max_batch` by default: as many slots as fit 90% of the memory free once the weights are loaded,
less 1 GiB kept for a prefill's activations and the image cache's most, at least 1 and at most
MAX_AUTO_BATCH
(generation.cache.slots_that_fit: CUDA's free memory on a GPU, the available memory on the CPU).

A failure stays with its request:
- a newcomer's prefill that runs out of memory ends that request with "out_of_memory" (the app
  answers 503 with Retry-After), any other error in it with "internal"; the running rows go on;
- a row whose logits hold NaN or inf ends with "non_finite" (500 internal_error) and its slot
  is scrubbed; a row whose sampler raises ends with "internal";
- a decode step that raises is made again row by row (a step changes nothing until it has
  succeeded), so only the rows that also fail alone end ("out_of_memory" or "internal");
- anything else (a bug in the engine itself) fails the requests in flight and frees every slot;
  the worker goes on either way.

A decode step reads nothing back to the host; the one read is the picked tokens, which carries
each row's finiteness check too. On one CUDA device the steps replay CUDA graphs
(`EngineSettings.cuda_graphs`); on the CPU they run eagerly.

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

from ..errors import SettingsError
from ..generation import GenerationConfig
from ..generation.cache import slots_that_fit
from ..generation.decoder import NON_FINITE, SAMPLER_FAILED, DecodeState, Row, make_generator, pick_tokens
from ..generation.features import ImageFeatureCache
from ..loading.placement import execution_device
from ..prompts import collate
from ..streaming import TextStream
from ..tokenizer import stop_token_ids

log = logging.getLogger("cogvlm.serve")

#: The most slots `max_batch` gets from free memory alone (`--max-batch N` may ask for more).
MAX_AUTO_BATCH = 32
#: A row's decode step failed when it was made alone: out of memory, or another error.
STEP_OUT_OF_MEMORY, STEP_FAILED = -3, -4
#: What a row whose pick is a failure code ends with (Event.error).
FAILURES = {
    NON_FINITE: "non_finite",
    SAMPLER_FAILED: "internal",
    STEP_OUT_OF_MEMORY: "out_of_memory",
    STEP_FAILED: "internal",
}


@dataclass(frozen=True)
class EngineSettings:
    """How many requests decode together (None: as many slots as fit the free memory, at most
    MAX_AUTO_BATCH), how many may wait, how long one may take, and whether decode steps replay
    CUDA graphs (None: when the model is on one CUDA device)."""

    max_batch: int | None = None
    max_queue: int = 32
    timeout_s: float = 300.0
    cuda_graphs: bool | None = None


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a text piece, the end, or a failure.

    kind: "text" (text), "done" (finish_reason "stop" or "length"), "error" (error: "timeout",
    "out_of_memory", "non_finite", "internal" or "shutdown"), or "cancelled" (put by the server
    when the client left).
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
    error: str | None = None
    stream: TextStream | None = None
    row: Row | None = None  # its row in the decode state, from its prefill to its end

    @property
    def prompt_tokens(self) -> int:
        return len(self.sample["input_ids"])

    def deliver(self, event: Event) -> None:
        """Put an event on the queue from the worker thread (a closed loop has no listener)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class Engine:
    """The model's only user: a worker thread that admits waiting requests into free slots,
    decodes one step for all of them, and sends each its text as it comes."""

    def __init__(self, pipeline: Any, settings: EngineSettings = EngineSettings()) -> None:
        self.model, self.tokenizer = pipeline.model, pipeline.tokenizer
        self.settings = settings
        # Every id that ends an answer (CogVLM2: <|end_of_text|> and <|eot_id|>); none is ever sent.
        self.eos = stop_token_ids(self.tokenizer, self.model.config)
        length = getattr(pipeline, "context_length", None) or self.model.config.max_position_embeddings
        self._images = getattr(pipeline, "image_cache", None)
        if self._images is None:
            self._images = ImageFeatureCache()
        self.max_batch = settings.max_batch or slots_that_fit(
            self.model, length, MAX_AUTO_BATCH, keep=self._images.max_bytes
        )
        self._state = DecodeState(self.model, self.max_batch, length, graphs=settings.cuda_graphs)
        self._device = execution_device(self.model.model.embed_tokens)
        log.info(
            "engine: %d slots of %d tokens, %.1f MiB of KV cache%s",
            self.max_batch,
            length,
            self._state.cache.nbytes / 2**20,
            ", CUDA graphs" if self._state.graphs else "",
        )
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []  # the jobs holding a slot (worker thread only)
        self._admitted: list[Job] = []  # taken from the queue and not yet done: the slots in use
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
        Raises QueueFull when the free batch slots and the waiting queue are all taken, and
        SettingsError when prompt + max_new_tokens is over a slot."""
        job = Job(sample, config, request_id, time.monotonic() + self.settings.timeout_s, asyncio.get_running_loop())
        need, length = job.prompt_tokens + config.max_new_tokens, self._state.cache.length
        if need > length:
            raise SettingsError(f"prompt + max_new_tokens is {need} tokens, over the engine's {length}")
        with self._wake:
            free = self.max_batch - len(self._admitted)
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
                while not self._pending and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._running)
                newcomers = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                self._admitted = self._running + newcomers
            try:
                with torch.inference_mode():
                    self._step(newcomers)
            except Exception:  # a failure outside the model calls: fail what is in flight, go on
                jobs = list(dict.fromkeys(self._running + newcomers))
                log.exception("the engine failed; requests %s", ", ".join(j.request_id for j in jobs))
                self._fail(jobs, "internal")
                self._drop_done()
            with self._wake:
                self._admitted = list(self._running)
        with self._wake:
            self._fail(self._running + list(self._pending), "shutdown")
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
        for job in self._running:
            if not job.cancelled and now > job.deadline:
                self._fail([job], "timeout")
        self._drop_done()
        if not self._running:
            return
        jobs = sorted(self._running, key=lambda j: j.row.slot)
        self._state.feed([job.row for job in jobs])  # each row's last token, newcomers' first included
        try:
            logits = self._state.step()
        except Exception:  # not one row's fault as far as we know: find the rows that fail alone
            log.exception("a decode step failed; requests %s decode alone", ", ".join(j.request_id for j in jobs))
            picked = [self._step_alone(job) for job in jobs]
        else:
            picked = self._pick(self._state.select(logits, [job.row for job in jobs]), jobs)
        for job, token in zip(jobs, picked):
            self._take(job, token)
        self._drop_done()

    def _join(self, job: Job) -> None:
        """Prefill alone, straight into a free slot, and take the first token."""
        sample = job.sample
        job.row = Row(job.config, sample["input_ids"], job.tokens, make_generator(job.config, self._device))
        try:
            inputs = collate([sample], pad_token_id=self.tokenizer.pad_token_id)
            inputs = {k: v.to(self._device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            inputs["image_features"] = self._images(
                self.model, [[img.to(self.model.dtype) for img in sample["images"] or []]]
            )
            logits = self._state.admit([job.row], inputs, share_prefix=True)
        except Exception as e:
            job.row = None
            if _out_of_memory(e):
                log.warning("request %s: out of memory in its prefill (%d tokens)", job.request_id, job.prompt_tokens)
                self._fail([job], "out_of_memory")
            else:
                log.exception("request %s: its prefill failed", job.request_id)
                self._fail([job], "internal")
            return
        self._running.append(job)
        job.stream = TextStream(self.tokenizer, job.config.stop)
        self._take(job, self._pick(logits, [job])[0])

    def _step_alone(self, job: Job) -> int:
        """The job's row decoded alone after a failed step: its pick, or a failure code."""
        slot = job.row.slot
        try:
            logits = self._state.step(slot, slot + 1, eager=True)
        except Exception as e:
            log.exception("request %s: its decode step fails alone", job.request_id)
            return STEP_OUT_OF_MEMORY if _out_of_memory(e) else STEP_FAILED
        return self._pick(logits, [job])[0]

    def _pick(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """Next token of each job (logits (N, V) in the jobs' order), or a negative failure code
        (FAILURES) for a job whose logits are not finite or whose sampler raised."""
        return pick_tokens(logits, [job.row for job in jobs])

    def _take(self, job: Job, token: int) -> None:
        """A picked token, or a failure code, for one job: anything that goes wrong is its own."""
        if token < 0:
            log.error("request %s: %s at token %d", job.request_id, FAILURES[token], len(job.tokens))
            self._fail([job], FAILURES[token])
            return
        try:
            self._accept(job, token)
        except Exception:
            log.exception("request %s: could not take token %d", job.request_id, token)
            self._fail([job], "internal")

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
                job.finished, job.error = True, error
                job.deliver(Event("error", error=error))

    def _drop_done(self) -> None:
        """Free the slots of the jobs that ended, in place (zeroed after NaN or inf: see SlotCache.free)."""
        keep = []
        for job in self._running:
            if job.finished or job.cancelled:
                self._state.release(job.row, scrub=job.error == "non_finite")
            else:
                keep.append(job)
        self._running = keep


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
