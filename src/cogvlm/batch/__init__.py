"""Batch jobs: captions and answers for whole datasets, resumable, on one device, all GPUs, or Ray.

    >>> summary = cogvlm.batch_infer(["photos/", "more.jsonl"], "captions.jsonl", batch_size=16)
    >>> print(summary)   # done, skipped, failed, images/s

The same job runs on one process, as one shard per process under torchrun / accelerate launch, or
as a Ray Data pipeline (`ray="local"` or an address), and writes the same rows. Modules, one job each:

    sources.py  inputs -> items with stable ids (files, folders, manifests, WebDataset shards)
    images.py   an item's image read and resized (local, shard member, or SSRF-safe URL)
    answer.py   prepared images -> rows through Pipeline.batch
    store.py    journals while running, the merged output at the end, resume
    local.py    one process: worker threads read ahead, the model answers in batches
    shard.py    torchrun / accelerate: a stable split of the ids across processes
    on_ray.py   the Ray Data pipeline: read tasks and an actor pool of models
    run.py      batch_infer: the steps, whichever of the above answers

pyarrow (Parquet) and ray are imported only when a job needs them (`pip install 'cogvlm[batch]'`).
"""

from .job import CAPTION_QUERY, BatchJob, BatchSummary
from .run import batch_infer
from .sources import Columns

__all__ = ["batch_infer", "BatchSummary", "BatchJob", "Columns", "CAPTION_QUERY"]
