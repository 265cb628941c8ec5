"""A cluster: the same job as a Ray Data pipeline.

    items ─► map(read and resize)   Ray tasks, anywhere in the cluster (light: a quarter CPU each)
          ─► map_batches(Answerer)  an actor pool, one model per actor: a GPU each on a cluster
                                    with GPUs, else CPU actors sharing three quarters of the CPUs
          ─► this process           rows and failures appended to the journals by our atomic writer

The driver lists the items and skips what is done, exactly as a local run; rows come back as JSON
text, so manifests' extra columns of any shape cross Ray unchanged. With `address="local"` a Ray
instance is started on this machine for the job and stopped after it.
"""

from __future__ import annotations

import json
import logging
import pickle
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .answer import answer, settings
from .extras import require
from .images import Failure, Prepared, prepare
from .job import BatchJob, Tally
from .sources import Item
from .store import Journal, json_line

#: CPUs a read task asks for: mostly waiting on files and the network, and Pillow is quick.
READ_CPUS = 0.25
#: Share of a CPU-only cluster's CPUs that the model actors take; the rest reads.
ACTOR_CPU_SHARE = 0.75


def run_ray(
    items: Sequence[Item],
    job: BatchJob,
    options: Any,
    rows: Journal,
    errors: Journal,
    address: str,
    actors: int | None = None,
    progress: bool = False,
) -> Tally:
    """Answer `items` on a Ray cluster (`address`, or "local"); rows go to the journals as they come."""
    import time

    from tqdm import tqdm

    from ..loading import resolve_config

    ray = require("ray", "--ray")
    require("ray.data", "--ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=None if address == "local" else address, include_dashboard=False, logging_level=logging.WARNING
        )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows written
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        actors = actors or gpus or len([n for n in ray.nodes() if n.get("Alive")]) or 1
        placement = (
            {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": resources["CPU"] * ACTOR_CPU_SHARE / actors}
        )
        side = resolve_config(options.model)[0].vision_config.image_size
        data = ray.data.from_items([{"item": pickle.dumps(item)} for item in items])
        data = data.map(_read, fn_kwargs={"side": side, "allow_remote": job.allow_remote_images}, num_cpus=READ_CPUS)
        data = data.map_batches(
            Answerer,
            fn_constructor_kwargs={"options": options, "job": job},
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **placement,
        )
        tally = Tally()
        start = time.perf_counter()
        with tqdm(total=len(items), unit="img", desc="cogvlm batch (ray)", disable=not progress) as bar:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                answered = [json.loads(r) for r in batch["row"] if r]
                failed = [json.loads(e) for e in batch["error"] if e]
                rows.append(answered)
                errors.append(failed)
                tally.done += len(answered)
                tally.failed += len(failed)
                bar.update(len(answered) + len(failed))
        tally.seconds = time.perf_counter() - start
        return tally
    finally:
        if started:
            ray.shutdown()


def _read(row: dict[str, Any], side: int, allow_remote: bool) -> dict[str, Any]:
    """A Ray task: an item's image at the model's side (zeros and a reason when it failed)."""
    item = pickle.loads(row["item"])
    prepared = prepare(item, side, allow_remote)
    if isinstance(prepared, Failure):
        blank = np.zeros((side, side, 3), np.uint8)
        return {"item": row["item"], "pixels": blank, "width": 0, "height": 0, "error": prepared.reason}
    pixels = np.asarray(prepared.image, dtype=np.uint8)
    return {"item": row["item"], "pixels": pixels, "width": prepared.width, "height": prepared.height, "error": ""}


class Answerer:
    """A Ray actor holding one model: batches of read images -> rows and failures as JSON text."""

    def __init__(self, options: Any, job: BatchJob) -> None:
        import torch

        from ..pipeline import load

        cpus = require("ray").get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.vlm, self.job = load(options), job
        self.recorded = settings(self.vlm, job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in batch["item"]]
        failures = {i: Failure(item, str(r)) for i, (item, r) in enumerate(zip(items, batch["error"])) if r}
        ready = [
            Prepared(item, Image.fromarray(batch["pixels"][i]), int(batch["width"][i]), int(batch["height"][i]))
            for i, item in enumerate(items)
            if i not in failures
        ]
        answered, refused = answer(self.vlm, ready, self.job, self.recorded) if ready else ([], [])
        out_rows = [json_line(r) for r in answered]
        out_errors = [json_line(f.to_dict()) for f in [*failures.values(), *refused]]
        n = max(len(out_rows), len(out_errors))
        return {
            "row": np.array(out_rows + [""] * (n - len(out_rows)), dtype=object),
            "error": np.array(out_errors + [""] * (n - len(out_errors)), dtype=object),
        }
