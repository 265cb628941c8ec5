"""`batch_infer`: one job over a dataset, on one process, under torchrun / accelerate, or on Ray.

The steps are the same however it runs: list the items, skip the ids the output already has, answer
the rest (this process's shard of them, or all of them through a Ray Data pipeline), and merge the
journals into the output. Only the answering step differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .. import launcher
from ..errors import CogVLMError
from ..loading import DEFAULT_MODEL, LoadOptions
from ..pipeline import Pipeline, load
from ..prompts import GROUNDED_CAPTION
from .job import CAPTION_QUERY, BatchJob, BatchSummary, Tally
from .shard import Shard
from .sources import Columns, Item, collect
from .store import Journal, OutputStore

PathLike = str | os.PathLike


def batch_infer(
    inputs: PathLike | Sequence[PathLike],
    out: PathLike,
    *,
    model: PathLike | LoadOptions | Pipeline | None = None,
    query: str | None = None,
    ground: bool = False,
    template: str | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    overwrite: bool = False,
    allow_remote_images: bool = False,
    columns: Columns = Columns(),
    ray: str | None = None,
    ray_actors: int | None = None,
    progress: bool = False,
    **generation: Any,
) -> BatchSummary:
    """Answer `query` (default: a caption) about every image of `inputs`, into `out` (.jsonl or .parquet).

    Args:
        inputs: image files, folders, manifests (.jsonl, .csv, .parquet), WebDataset .tar shards,
            glob patterns of them, or URLs (see `sources`).
        out: the output; a rerun skips the ids it has (resume), `overwrite` starts over. Failures
            go to `out` + ".errors.jsonl".
        model: a folder or hub id, LoadOptions, or a loaded Pipeline (not with `ray`); None: the
            shipped default model.
        query: the question for every image a manifest row gives none; `ground`: grounded captions
            (the grounding prompt on the base template), the boxes in every row.
        ray: None, "local" (a Ray instance on this machine) or a cluster address; `ray_actors`:
            model replicas (default: one per GPU of the cluster, else one per node).
        workers: threads reading images ahead of the model (default: up to 4, one per core).
        generation: GenerationConfig fields (max_new_tokens, do_sample, ...) over the model's defaults.

    Returns:
        The run's summary (done, skipped, failed, images/s, model-busy share).
    """
    if ground and query is not None:
        raise CogVLMError("give a query or ground, not both (ground asks the grounded-caption question)")
    job = BatchJob(
        query=GROUNDED_CAPTION if ground else (query or CAPTION_QUERY),
        template=template or ("base" if ground else None),
        generation=generation,
        model_name=_model_name(model),
        batch_size=batch_size,
        workers=max(1, min(4, os.cpu_count() or 1)) if workers is None else workers,
        allow_remote_images=allow_remote_images,
    )
    store = OutputStore(out)
    shard = Shard.from_env()
    if ray is not None and shard.world > 1:
        raise CogVLMError("a Ray job starts its own actors: run it with python, not under torchrun or accelerate")
    if ray is not None and isinstance(model, Pipeline):
        raise CogVLMError("a Ray job loads the model in its actors: give a folder, hub id or LoadOptions")
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    joined, clean = launcher.join(), False
    try:
        if overwrite and shard.rank == 0:
            store.reset()
        launcher.barrier()
        items = collect(paths, columns)
        done = store.done_ids()
        todo = [item for item in items if item.id not in done and shard.owns(item.id)]
        rows, errors = store.journals(shard.rank)
        try:
            tally = _answer(todo, job, model, shard, rows, errors, ray, ray_actors, progress and shard.rank == 0)
        finally:
            rows.close()
            errors.close()
        tallies = launcher.gather(tally)  # every process is done once this returns
        if shard.rank == 0:
            store.merge([item.id for item in items])
        clean = True
    finally:
        if joined:
            launcher.leave(clean)
    busy = [t.busy / t.seconds for t in tallies if t.seconds > 0 and ray is None]
    return BatchSummary(
        out=store.out,
        errors=store.errors if store.errors.exists() else None,
        done=sum(t.done for t in tallies),
        skipped=sum(item.id in done for item in items),
        failed=sum(t.failed for t in tallies),
        seconds=max(t.seconds for t in tallies),
        busy_share=sum(busy) / len(busy) if busy else None,
    )


def _answer(
    todo: list[Item],
    job: BatchJob,
    model: PathLike | LoadOptions | Pipeline | None,
    shard: Shard,
    rows: Journal,
    errors: Journal,
    ray: str | None,
    ray_actors: int | None,
    progress: bool,
) -> Tally:
    """Answer this process's items: locally with a loaded Pipeline, or as a Ray Data pipeline."""
    if not todo:
        return Tally()
    if ray is not None:
        from .on_ray import run_ray

        return run_ray(todo, job, _options(model), rows, errors, ray, ray_actors, progress)
    from .local import run_local

    vlm = model if isinstance(model, Pipeline) else load(shard.place(_options(model)))
    return run_local(vlm, todo, job, rows, errors, progress)


def _options(model: PathLike | LoadOptions | None) -> LoadOptions:
    return model if isinstance(model, LoadOptions) else LoadOptions(model=model)


def _model_name(model: PathLike | LoadOptions | Pipeline | None) -> str:
    """The model as rows record it: the reference given, "default" for the shipped model."""
    if isinstance(model, Pipeline):
        folder = getattr(model, "folder", None)
        return "default" if folder is not None and Path(folder) == DEFAULT_MODEL else str(folder)
    ref = _options(model).model
    return "default" if ref is None else str(ref)
