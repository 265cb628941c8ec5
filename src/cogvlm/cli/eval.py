"""`cogvlm eval`: score a model on a benchmark read from its official files."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import CogVLMError
from ..eval import format_result, shapes_table, task_list
from ..eval.runner import Answerer, load_items, run
from ..eval.served import ServedModel
from ..eval.tasks import Task, get_task
from ..eval.tasks.shapes import DEFAULT_N, HELDOUT_SEED, SHAPES, shapes_items
from .options import add_loading_flags, load_pipeline

DEFAULT_OUT = Path("eval-results")


def _check(args: argparse.Namespace, task: Task) -> None:
    for flag, value in (("--limit", args.limit), ("--n", args.n), ("--num-beams", args.num_beams)):
        if value is not None and value < 1:
            raise CogVLMError(f"{flag} must be >= 1 (got {value})")
    if args.batch_size < 1:
        raise CogVLMError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.api_base is None:
        wrong = [f for f, v in (("--api-key", args.api_key), ("--served-model", args.served_model)) if v]
        if wrong:
            raise CogVLMError(f"{', '.join(wrong)} only apply with --api-base URL")
    else:
        loading = ("--model", "--revision", "--tokenizer", "--device-map", "--quantize")
        wrong = [f for f in loading if getattr(args, f[2:].replace("-", "_"))]
        if wrong:
            raise CogVLMError(f"--api-base scores a served model: drop {', '.join(wrong)}")
        if (args.num_beams or 1) > 1:
            raise CogVLMError("--api-base: a served model answers greedily, drop --num-beams")
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


def _task(args: argparse.Namespace) -> Task:
    """The task the flags name, checked, with --num-beams applied (before anything is loaded)."""
    if args.task is None:
        raise CogVLMError("give a TASK (cogvlm eval --list shows them)")
    task = get_task(args.task)
    _check(args, task)
    return task if args.num_beams is None else dataclasses.replace(task, num_beams=args.num_beams)


def _answerer(args: argparse.Namespace) -> tuple[Answerer | Callable[[], Answerer], str]:
    """What answers, and the name results are filed under: a served model (--api-base), or a
    loader of the model that loads on first call (a finished run is rescored without it)."""
    from .. import launcher

    if args.api_base:
        served = ServedModel(args.api_base, args.served_model, args.api_key)
        return served, served.label
    args.device = launcher.local_gpu(args.device)
    return functools.cache(lambda: load_pipeline(args)), _model_name(args.model)


def _say(text: str) -> None:
    """Print once: on rank 0 of a multi-process launch."""
    from .. import launcher

    if launcher.world()[0] == 0:
        print(text)


def _run_shapes(args: argparse.Namespace, task: Task) -> None:
    pipeline, model = _answerer(args)
    n, seed = args.n or DEFAULT_N, HELDOUT_SEED if args.seed is None else args.seed
    results = []
    for shuffle in (False, True) if args.shuffle_images else (False,):
        split = f"seed{seed}-n{n}" + ("-shuffled" if shuffle else "")
        results.append(
            run(
                task,
                shapes_items(n, seed, shuffle),
                pipeline,
                split=split,
                model=model,
                out=args.out,
                batch_size=args.batch_size,
            )
        )
    _say(shapes_table(*results))
    _say(f"{n} questions per type, seed {seed}; files in {args.out}/")


def cmd_eval(args: argparse.Namespace) -> int:
    """`cogvlm eval ...`: 0 on success; Ctrl-C says how to resume. Under torchrun / accelerate
    launch the processes share the questions (see cogvlm.eval.parallel)."""
    if args.list:
        print(task_list())
        return 0
    task = _task(args)
    from .. import launcher  # torch.distributed: only once the flags are known to be good

    joined, clean = launcher.join(), False
    try:
        if task.name == SHAPES.name:
            _run_shapes(args, task)
            clean = True
            return 0
        split = args.split or task.splits[0]
        items, skipped = load_items(task, args.data, split, args.limit)  # fail before loading the model
        pipeline, model = _answerer(args)
        result = run(
            task, items, pipeline, split=split, model=model, out=args.out, batch_size=args.batch_size, skipped=skipped
        )
        _say(format_result(result, args.out))
        clean = True
        return 0
    except KeyboardInterrupt:
        print("\ncogvlm eval: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    finally:
        if joined:
            launcher.leave(clean)


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
        "--num-beams",
        type=int,
        metavar="N",
        help="beam search with N beams (default: the task's, greedy; the official captioning "
        "script's commented-out setting is 5); recorded in the run's settings",
    )
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
    served = p.add_argument_group("a served model instead of --model (docs/eval.md)")
    served.add_argument(
        "--api-base",
        metavar="URL",
        help="score a running OpenAI-compatible server (cogvlm serve), e.g. http://127.0.0.1:8000/v1",
    )
    served.add_argument("--api-key", metavar="KEY", help="the server's API key, if it needs one")
    served.add_argument("--served-model", metavar="NAME", help="model name to ask for (default: the server's first)")
    add_loading_flags(p)
    p.set_defaults(func=cmd_eval)
