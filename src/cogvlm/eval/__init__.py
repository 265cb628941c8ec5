"""Benchmark evaluation: `cogvlm eval TASK` and the functions behind it.

    >>> from cogvlm.eval import evaluate_shapes
    >>> evaluate_shapes(cogvlm.load(), n=100)["per_type"]["color"]

Tasks read the benchmarks' official files from a local folder (nothing is downloaded); the
files, prompts and metrics of each are in docs/eval.md. Answers come from a loaded pipeline or a
served model (`ServedModel`); under torchrun the processes share the questions (`parallel`).
`cogvlm.cli.eval` is the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import caption_scores, vqa_accuracy
from .runner import Answerer, evaluate, evaluate_shapes, load_items, paper_cell, predict, run, summarise, summary_table
from .served import ServedModel
from .tasks import Item, Task, get_task, registry
from .tasks.shapes import HELDOUT_SEED, SHAPES, shapes_items


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
    lines.append(
        f"  {counts['scored']} scored of {counts['questions']} questions{skipped}, "
        f"{result['seconds']} s; files in {out}/"
    )
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


__all__ = [
    "evaluate",
    "evaluate_shapes",
    "shapes_items",
    "run",
    "predict",
    "summarise",
    "load_items",
    "summary_table",
    "get_task",
    "registry",
    "Task",
    "Item",
    "Answerer",
    "ServedModel",
    "vqa_accuracy",
    "caption_scores",
    "HELDOUT_SEED",
]
