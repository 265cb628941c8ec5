"""Benchmark evaluation: `cogvlm eval TASK` and the functions behind it.

    >>> from cogvlm.eval import evaluate_shapes
    >>> evaluate_shapes(cogvlm.load(), n=100)["per_type"]["color"]

Tasks read the benchmarks' official files from a local folder (nothing is downloaded); the
files, prompts and metrics of each are in docs/eval.md. `cli_main` is the command.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import CogVLMError
from .metrics import caption_scores, vqa_accuracy
from .runner import Answerer, evaluate, load_items, paper_cell, predict, run, summarise, summary_table
from .tasks import Item, Task, get_task, registry
from .tasks.shapes import DEFAULT_N, HELDOUT_SEED, SHAPES, evaluate_shapes, shapes_items

DEFAULT_OUT = Path("eval-results")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, returned as status 2 by cli_main
        raise CogVLMError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cogvlm eval", description="Score a model on a benchmark read from its official "
                "files in a local folder; files, prompts and metrics per task: docs/eval.md.")
    p.add_argument("task", nargs="?", metavar="TASK", help="a task name (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the tasks, their splits and files")
    p.add_argument("--data", type=Path, metavar="DIR", help="folder with the benchmark's files")
    p.add_argument("--model", metavar="DIR", help="model folder (default: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--split", help="split to score (default: the task's first, see --list)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"predictions, results and summary.md (default: {DEFAULT_OUT})")
    shapes = p.add_argument_group("shapes only")
    shapes.add_argument("--n", type=int, metavar="N", help=f"questions per type (default: {DEFAULT_N})")
    shapes.add_argument("--seed", type=int, help=f"scene seed (default: {HELDOUT_SEED}, held out)")
    shapes.add_argument("--shuffle-images", action="store_true",
                        help="also score with each question paired with another scene's image")
    return p


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


def task_list() -> str:
    """One line per task: name, splits (default first), metric and expected files."""
    rows = [(t.name, ", ".join(t.splits), t.metric, t.files) for t in registry().values()]
    width = [max(len(r[k]) for r in rows) for k in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c:<{width[2]}}  {d}" for a, b, c, d in rows)


def format_result(result: dict[str, Any], out: Path) -> str:
    """A few lines for the terminal: the headline score beside the paper's, per type, counts."""
    value = result["scores"].get(result["metric"])
    head = f"{result['task']} {result['split']}: "
    if value is None:
        head += "no public answers in this split: see the submission file"
    else:
        head += f"{result['metric']} {100 * value:.2f} (paper: {paper_cell(result)})"
    lines = [head]
    extra = {k: v for k, v in result["scores"].items() if k != result["metric"]}
    if extra:
        lines.append("  " + ", ".join(f"{k} {100 * v:.2f}" for k, v in extra.items()))
    if result["per_type"]:
        lines.append("  per type: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in result["per_type"].items()))
    counts = result["counts"]
    missing = counts["skipped_missing_images"]
    skipped = f", {missing} skipped (image missing)" if missing else ""
    lines.append(f"  {counts['scored']} scored of {counts['questions']} questions{skipped}, "
                 f"{result['seconds']} s; files in {out}/")
    return "\n".join(lines)


def shapes_table(true: dict[str, Any], shuffled: dict[str, Any] | None = None) -> str:
    """Per-type accuracy of the shapes task, with the shuffled-image column when given."""
    columns = [true] + ([shuffled] if shuffled else [])
    header = f"{'type':<16}{'true image':>12}" + (f"{'shuffled image':>16}" if shuffled else "")
    widths = (12, 16)
    rows = [header]
    for kind in list(true["per_type"]) + ["overall"]:
        cells = [r["scores"][SHAPES.metric] if kind == "overall" else r["per_type"][kind] for r in columns]
        rows.append(f"{kind:<16}" + "".join(f"{v:>{w}.3f}" for v, w in zip(cells, widths)))
    return "\n".join(rows)


def _model_name(model: str | None) -> str:
    return str(Path(model).resolve()) if model else "default"


def _pipeline_loader(args: argparse.Namespace) -> Callable[[], Answerer]:
    """Loads the model on first call (a finished run is rescored without it), then reuses it."""
    from ..pipeline import load

    return functools.cache(lambda: load(args.model, device=args.device, progress=True))


def _run_shapes(args: argparse.Namespace) -> None:
    pipeline = _pipeline_loader(args)
    n, seed = args.n or DEFAULT_N, HELDOUT_SEED if args.seed is None else args.seed
    results = []
    for shuffle in (False, True) if args.shuffle_images else (False,):
        split = f"seed{seed}-n{n}" + ("-shuffled" if shuffle else "")
        results.append(run(SHAPES, shapes_items(n, seed, shuffle), pipeline, split=split,
                           model=_model_name(args.model), out=args.out, batch_size=args.batch_size))
    print(shapes_table(*results))
    print(f"{n} questions per type, seed {seed}; files in {args.out}/")


def cli_main(argv: Sequence[str]) -> int:
    """`cogvlm eval ...`: 0 on success, 2 on a user error (one line on stderr), 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(list(argv))
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
        result = run(task, items, _pipeline_loader(args), split=split, model=_model_name(args.model),
                     out=args.out, batch_size=args.batch_size, skipped=skipped)
        print(format_result(result, args.out))
        return 0
    except CogVLMError as e:
        print(f"cogvlm eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncogvlm eval: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130


__all__ = ["cli_main", "evaluate", "evaluate_shapes", "shapes_items", "run", "predict", "summarise",
           "load_items", "summary_table", "get_task", "registry", "Task", "Item", "Answerer",
           "vqa_accuracy", "caption_scores", "HELDOUT_SEED"]
