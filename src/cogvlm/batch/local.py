"""The answering loop of one process: worker threads read images ahead, the model answers in batches.

Threads suffice for the reading: Pillow releases the GIL while it decodes and resizes. They stay
`2 x window` images ahead, so while the model answers one window the next is being read. Within a
window, requests are grouped by question (equal questions give equal prompt lengths, so batches
need no padding); answers do not depend on the grouping (greedy batches equal each request alone).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from .answer import answer, settings
from .images import Failure, Prepared, prepare
from .job import BatchJob, Tally
from .sources import Item
from .store import Journal

#: Batches per window of requests grouped by question.
WINDOW_BATCHES = 4


def run_local(
    vlm: Any, items: Sequence[Item], job: BatchJob, rows: Journal, errors: Journal, progress: bool = True
) -> Tally:
    """Answer `items` with a loaded Pipeline; rows and failures go to the journals chunk by chunk."""
    side = vlm.model.config.vision_config.image_size
    recorded = settings(vlm, job)
    window = job.batch_size * WINDOW_BATCHES
    tally = Tally()
    start = time.perf_counter()
    with (
        ThreadPoolExecutor(job.workers, thread_name_prefix="cogvlm-read") as pool,
        tqdm(total=len(items), unit="img", desc="cogvlm batch", disable=not progress, smoothing=0.1) as bar,
    ):
        for chunk in _chunks(_read_ahead(pool, items, side, job, 2 * window), window):
            failures = [p for p in chunk if isinstance(p, Failure)]
            bar.update(len(failures))
            ready = sorted((p for p in chunk if isinstance(p, Prepared)), key=lambda p: _bucket(job, p))
            for batch in _chunks(iter(ready), job.batch_size):
                t0 = time.perf_counter()
                answered, refused = answer(vlm, batch, job, recorded)
                tally.busy += time.perf_counter() - t0
                rows.append(answered)
                failures += refused
                tally.done += len(answered)
                bar.update(len(batch))
            errors.append(f.to_dict() for f in failures)
            tally.failed += len(failures)
            tally.seconds = time.perf_counter() - start
            bar.set_postfix(busy=f"{tally.busy / tally.seconds:.0%}", failed=tally.failed, refresh=False)
    tally.seconds = time.perf_counter() - start
    return tally


def _bucket(job: BatchJob, prepared: Prepared) -> tuple[int, str]:
    query = job.query_for(prepared.item)
    return len(query), query


def _read_ahead(
    pool: ThreadPoolExecutor, items: Sequence[Item], side: int, job: BatchJob, ahead: int
) -> Iterator[Prepared | Failure]:
    """Each item prepared by the pool, in order, with up to `ahead` items in flight."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(prepare, item, side, job.allow_remote_images))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(stream: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for value in stream:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
