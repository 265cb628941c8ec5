"""Prepared images -> output rows, through the Pipeline's batched generation (local runs and Ray actors).

A batch goes through `Pipeline.batch`, the call `cogvlm ask` makes, so a row's answer is the one
`cogvlm ask` gives that image alone (greedy batches equal each request alone). A request the model
refuses (a manifest question too long for the context) fails alone: the batch is then run row by row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..errors import CogVLMError
from ..grounding import parse_boxes
from .images import Failure, Prepared
from .job import BatchJob


def settings(vlm: Any, job: BatchJob) -> dict[str, Any]:
    """The generation settings every row records: the model's defaults with the job's changes."""
    merged = {**dataclasses.asdict(vlm.generation), **job.generation}
    stop = merged.get("stop") or ()
    merged["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return {"template": job.template or vlm.model.config.template_version, **merged}


def answer(
    vlm: Any, batch: Sequence[Prepared], job: BatchJob, recorded: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Rows for a batch of prepared images, and the requests the model refused."""
    requests = [{"query": job.query_for(p.item), "image": p.image, "template_version": job.template} for p in batch]
    try:
        texts: list[str | Failure] = list(vlm.batch(requests, **job.generation))
    except CogVLMError:
        texts = [_alone(vlm, request, p, job) for request, p in zip(requests, batch)]
    rows = [_row(p, t, job, recorded) for p, t in zip(batch, texts) if not isinstance(t, Failure)]
    return rows, [t for t in texts if isinstance(t, Failure)]


def _alone(vlm: Any, request: dict[str, Any], prepared: Prepared, job: BatchJob) -> str | Failure:
    try:
        return vlm.batch([request], **job.generation)[0]
    except CogVLMError as e:
        return Failure(prepared.item, str(e))


def _row(p: Prepared, text: str, job: BatchJob, recorded: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": p.item.id,
        "image": p.item.image,
        "query": job.query_for(p.item),
        "answer": text,
        "boxes": [box.to_dict(p.width, p.height) for box in parse_boxes(text)],
        "width": p.width,
        "height": p.height,
        "model": job.model_name,
        "generation": recorded,
        **p.item.extra,
    }
