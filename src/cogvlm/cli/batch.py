"""`cogvlm batch`: captions or answers for a whole dataset into one file, resumable (cogvlm.batch_infer).

cogvlm batch photos/ more.jsonl shards/*.tar --out captions.jsonl
torchrun --nproc-per-node 8 -m cogvlm.cli batch photos/ --out captions.jsonl
cogvlm batch photos/ --out captions.parquet --ray ray://head:10001
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import CogVLMError
from .options import add_generation_flags, add_loading_flags, generation_kwargs, load_options


def cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import Columns, batch_infer
    from ..batch.shard import Shard

    if args.ray is not None and args.ray != "local" and Path(args.ray).exists():
        raise CogVLMError(f"--ray took '{args.ray}' as the cluster address: put --ray after the inputs")
    summary = batch_infer(
        args.inputs,
        args.out,
        model=load_options(args, progress=False),
        query=args.query,
        ground=args.ground,
        template=args.template,
        batch_size=args.batch_size,
        workers=args.workers,
        overwrite=args.overwrite,
        allow_remote_images=args.allow_remote_images,
        columns=Columns(image=args.image_column, id=args.id_column, query=args.query_column),
        ray=args.ray,
        ray_actors=args.ray_actors,
        progress=not args.no_progress,
        **generation_kwargs(args),
    )
    if Shard.from_env().rank == 0:
        print(f"cogvlm batch: {summary}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add `batch` to the command tree."""
    text = "caption or question a whole dataset into one .jsonl or .parquet file; a rerun resumes"
    p = sub.add_parser("batch", help=text, description=text)
    p.set_defaults(func=cmd_batch)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (recursive), manifests (.jsonl, .csv, .parquet), WebDataset .tar "
        "shards, or glob patterns of them",
    )
    p.add_argument(
        "--out", "-o", required=True, metavar="FILE", help=".jsonl or .parquet; failures in FILE.errors.jsonl"
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--query", "-q", help="the question for every image a manifest row gives none (default: a caption)"
    )
    what.add_argument("--ground", action="store_true", help="grounded captions: a box after each object")
    p.add_argument("--overwrite", action="store_true", help="start over instead of skipping the ids FILE has")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, help="threads reading images ahead of the model (default: up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only, as the server does)",
    )
    g = p.add_argument_group("manifests")
    g.add_argument("--image-column", help="column with the image path or URL (default: image, path, url, ...)")
    g.add_argument("--id-column", default="id", help="column with the row's id (default: id; else the image)")
    g.add_argument("--query-column", default="query", help="column with the row's own question (default: query)")
    g = p.add_argument_group("Ray cluster")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run as a Ray Data pipeline: on this machine, or on the cluster at ADDRESS (put it after the inputs)",
    )
    g.add_argument("--ray-actors", type=int, help="model replicas (default: one per GPU, else one per node)")
    add_loading_flags(p)
    add_generation_flags(p)
