"""`cogvlm eval`: score a model on a benchmark read from its official files."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import CogVLMError
from ..eval import format_result, shapes_table, task_list
from ..eval.runner import Answerer, load_items, run
from ..eval.tasks import Task, get_task
from ..eval.tasks.shapes import DEFAULT_N, HELDOUT_SEED, SHAPES, shapes_items
from .options import add_loading_flags, load_pipeline

DEFAULT_OUT = Path("eval-results")


def _check(args: argparse.Namespace, task: Task) -> None:
    for flag, value in (("--limit", args.limit), ("--n", args.n)):
        if value is not None and value < 1:
            raise CogVLMError(f"{flag} must be >= 1 (got {value})")
    if args.batch_size < 1:
        raise CogVLMError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if task is SHAPES:
        wrong = [f for f, v in (("--data", args.data), ("--split", args.split), ("--limit", args.limit)) if v]
        if wrong:
            raise CogVLMError(f"shapes generates its questions: drop {', '.join(wrong)} (use --n, --seed)")
    else:
        given = (("--n", args.n), ("--seed", args.seed), ("--shuffle-images", args.shuffle_images or None))
        wrong = [f for f, v in given if v is not None]
        if wrong:
            raise CogVLMError(f"{', '.join(wrong)} only apply to the shapes task")
        if args.data is None:
            raise CogVLMError(f"{task.name} needs --data DIR (its files: {task.files})")


def _model_name(model: str | None) -> str:
    """The name results are filed under: a folder's absolute path, a hub id as given, or 'default'."""
    if not model:
        return "default"
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def _pipeline_loader(args: argparse.Namespace) -> Callable[[], Answerer]:
    """Loads the model on first call (a finished run is rescored without it), then reuses it."""
    return functools.cache(lambda: load_pipeline(args))


def _run_shapes(args: argparse.Namespace) -> None:
    pipeline = _pipeline_loader(args)
    n, seed = args.n or DEFAULT_N, HELDOUT_SEED if args.seed is None else args.seed
    results = []
    for shuffle in (False, True) if args.shuffle_images else (False,):
        split = f"seed{seed}-n{n}" + ("-shuffled" if shuffle else "")
        results.append(
            run(
                SHAPES,
                shapes_items(n, seed, shuffle),
                pipeline,
                split=split,
                model=_model_name(args.model),
                out=args.out,
                batch_size=args.batch_size,
            )
        )
    print(shapes_table(*results))
    print(f"{n} questions per type, seed {seed}; files in {args.out}/")


def cmd_eval(args: argparse.Namespace) -> int:
    """`cogvlm eval ...`: 0 on success; Ctrl-C says how to resume."""
    try:
        if args.list:
            print(task_list())
            return 0
        if args.task is None:
            raise CogVLMError("give a TASK (cogvlm eval --list shows them)")
        task = get_task(args.task)
        _check(args, task)
        if task is SHAPES:
            _run_shapes(args)
            return 0
        split = args.split or task.splits[0]
        items, skipped = load_items(task, args.data, split, args.limit)  # fail before loading the model
        result = run(
            task,
            items,
            _pipeline_loader(args),
            split=split,
            model=_model_name(args.model),
            out=args.out,
            batch_size=args.batch_size,
            skipped=skipped,
        )
        print(format_result(result, args.out))
        return 0
    except KeyboardInterrupt:
        print("\ncogvlm eval: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130


def register(sub: Any) -> None:
    """Add eval to the command tree."""
    p = sub.add_parser(
        "eval",
        help="benchmarks with their official metrics: cogvlm eval TASK | --list",
        description="Score a model on a benchmark read from its official "
        "files in a local folder; files, prompts and metrics per task: docs/eval.md.",
    )
    p.add_argument("task", nargs="?", metavar="TASK", help="a task name (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the tasks, their splits and files")
    p.add_argument("--data", type=Path, metavar="DIR", help="folder with the benchmark's files")
    p.add_argument("--split", help="split to score (default: the task's first, see --list)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"predictions, results and summary.md (default: {DEFAULT_OUT})",
    )
    shapes = p.add_argument_group("shapes only")
    shapes.add_argument("--n", type=int, metavar="N", help=f"questions per type (default: {DEFAULT_N})")
    shapes.add_argument("--seed", type=int, help=f"scene seed (default: {HELDOUT_SEED}, held out)")
    shapes.add_argument(
        "--shuffle-images", action="store_true", help="also score with each question paired with another scene's image"
    )
    add_loading_flags(p)
    p.set_defaults(func=cmd_eval)
