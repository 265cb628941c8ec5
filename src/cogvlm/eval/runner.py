"""Running a task: batched answers (greedy, or beam search where the task sets num_beams), scores,
and the files of a run.

`evaluate` asks a pipeline every question and summarises the scores (no files; the training
loop uses it through `evaluate_shapes`). `run` does the same for the CLI and keeps, in `out`:
- `{task}-{split}.predictions.jsonl`: a settings line, then one line per answer, appended and
  flushed as answers arrive, so a rerun with the same settings asks only what is missing (under
  torchrun, one part per process, merged at the end: `predictions`, `parallel`);
- `{task}-{split}.results.json`: settings, scores (overall and per type), counts, seconds and the
  paper's number;
- `{task}-{split}.submission.json` for tasks with an evaluation server format;
- `summary.md`: every results file of the folder in one table, the paper's numbers beside ours.
All but the predictions are written atomically (temporary file, then os.replace).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..errors import CogVLMError
from ..fileio import atomic_write_text
from .predictions import RunPredictions
from .tasks import DOCS, Item, Task
from .tasks.shapes import DEFAULT_N, HELDOUT_SEED, SHAPES, shapes_items


class Answerer(Protocol):
    """What a run needs of a model: `cogvlm.Pipeline.batch`."""

    def batch(self, requests: Sequence[dict[str, Any]], **gen: Any) -> list[str]: ...


# ----------------------------------------------------------------------------- items
def load_items(task: Task, data: Path | None, split: str, limit: int | None = None) -> tuple[list[Item], int]:
    """The first `limit` questions of a split whose image exists, and how many were skipped for a
    missing image (only tasks with `skip_missing_images`; otherwise a missing image is an error)."""
    if task.load is None:
        raise CogVLMError(f"{task.name} is not read from files")
    if split not in task.splits:
        raise CogVLMError(f"{task.name} has no split '{split}' (use one of: {', '.join(task.splits)})")
    if data is None or not Path(data).is_dir():
        raise CogVLMError(f"{data}: no such folder (--data: the {task.name} files, see {DOCS})")
    items: list[Item] = []
    missing = 0
    for item in task.load(Path(data), split):
        if limit is not None and len(items) >= limit:
            break
        if not Path(item.image).is_file():
            if not task.skip_missing_images:
                raise CogVLMError(f"{item.image}: image not found (expected layout: {DOCS})")
            missing += 1
            continue
        items.append(item)
    if not items:
        raise CogVLMError(f"{data}: no {task.name} questions in split '{split}'")
    if len({i.id for i in items}) != len(items):
        raise CogVLMError(f"{data}: {task.name} question ids are not unique in split '{split}'")
    return items, missing


# ----------------------------------------------------------------------------- answering
def _batches(items: Sequence[Item], task: Task, size: int) -> Iterable[list[Item]]:
    """Items with the same max_new_tokens, `size` at a time; within those, the questions about one
    image side by side (a Pipeline computes the [BOS, image] prefix they share once a batch).
    Otherwise in the items' order: settings and images by their first appearance."""

    def setting(item: Item) -> int:
        return item.max_new_tokens or task.max_new_tokens

    tokens: dict[int, int] = {}
    images: dict[Any, int] = {}
    for item in items:
        tokens.setdefault(setting(item), len(tokens))
        images.setdefault(_image_key(item.image), len(images))
    ordered = sorted(items, key=lambda i: (tokens[setting(i)], images[_image_key(i.image)]))
    for _, group in itertools.groupby(ordered, key=setting):
        group = list(group)
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _image_key(image: Any) -> Any:
    """Who an item's image is: its path, or the object itself (by identity) when it is loaded."""
    return str(image) if isinstance(image, (str, Path)) else id(image)


def _request(task: Task, item: Item) -> dict[str, Any]:
    return {"query": item.query, "image": item.image, "template_version": item.template or task.template}


def _beams(task: Task) -> dict[str, int]:
    """The task's beams as a generation setting; none when greedy, so greedy runs (and answerers
    that take only max_new_tokens, such as a served model) are asked as before."""
    return {} if task.num_beams == 1 else {"num_beams": task.num_beams}


def predict(
    pipeline: Answerer,
    task: Task,
    items: Sequence[Item],
    batch_size: int = 8,
    answered: dict[str, str] | None = None,
    on_answer: Callable[[Item, str], None] | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Raw answers by item id: those in `answered` are kept, the others asked in batches (greedy,
    or the task's num_beams).
    `on_answer` sees each new answer as it arrives; the progress bar shows the running score."""
    if batch_size < 1:
        raise CogVLMError(f"batch size must be >= 1 (got {batch_size})")
    raw = dict(answered or {})
    todo = [i for i in items if i.id not in raw]
    scorable = task.score is not None
    running = [task.score(i, task.clean(raw[i.id])) for i in items if scorable and i.target is not None and i.id in raw]
    total, count = sum(running), len(running)  # the running score, kept in O(1) per answer
    with tqdm(
        total=len(items),
        initial=len(items) - len(todo),
        desc=task.name,
        unit="q",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for chunk in _batches(todo, task, batch_size):
            texts = pipeline.batch(
                [_request(task, i) for i in chunk],
                max_new_tokens=chunk[0].max_new_tokens or task.max_new_tokens,
                do_sample=False,  # scores are of greedy answers, whatever the folder's generation_config says
                **_beams(task),
            )
            for item, text in zip(chunk, texts, strict=True):
                raw[item.id] = text
                if on_answer is not None:
                    on_answer(item, text)
                if scorable and item.target is not None:
                    total, count = total + task.score(item, task.clean(text)), count + 1
            bar.update(len(chunk))
            if count:
                bar.set_postfix_str(f"{task.metric} {100 * total / count:.2f}")
    return raw


def summarise(task: Task, items: Sequence[Item], raw: dict[str, str]) -> dict[str, Any]:
    """{"scores": {metric: value}, "per_type": {kind: value}, "counts": {...}} over the items that
    have a target. Accuracies are fractions; captioning scores are on pycocoevalcap's scale."""
    scored = [i for i in items if i.target is not None]
    answers = [task.clean(raw[i.id]) for i in scored]
    scores: dict[str, float] = {}
    per_type: dict[str, float] = {}
    if scored and task.corpus is not None:
        scores, per_type = task.corpus(scored, answers)
    elif scored and task.score is not None:
        values = [task.score(i, a) for i, a in zip(scored, answers)]
        by_kind: dict[str, list[float]] = defaultdict(list)
        for item, value in zip(scored, values):
            if item.kind:
                by_kind[item.kind].append(value)
        scores = {task.metric: fmean(values)}
        per_type = {kind: fmean(v) for kind, v in by_kind.items()}
    kinds = dict(Counter(i.kind for i in scored if i.kind))
    return {
        "scores": scores,
        "per_type": per_type,
        "counts": {"questions": len(items), "scored": len(scored), "per_type": kinds},
    }


def evaluate(
    pipeline: Answerer, task: Task, items: Sequence[Item], batch_size: int = 8, progress: bool = False
) -> dict[str, Any]:
    """Ask every item and summarise (see `summarise`); nothing is written."""
    return summarise(task, items, predict(pipeline, task, items, batch_size, progress=progress))


# ----------------------------------------------------------------------------- files
def run(
    task: Task,
    items: Sequence[Item],
    pipeline: Answerer | Callable[[], Answerer],
    *,
    split: str,
    model: str,
    out: Path,
    batch_size: int = 8,
    skipped: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate with resumable predictions and write the run's files (see the module doc).
    `pipeline` may be a function that loads it: it is called only if a question is left to ask.

    Under torchrun / accelerate launch (a joined process group, see `cogvlm.launcher`) every process
    answers its shard into its own part file; rank 0 then merges the parts, scores once and
    writes the files, and every process returns rank 0's result."""
    from .. import launcher  # torch.distributed: imported by a run, not with the package (the CLI checks first)
    from . import parallel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{task.name}-{split}"
    settings = {
        "task": task.name,
        "split": split,
        "model": model,
        "template": task.template,
        "prompt": task.prompt,
        "max_new_tokens": task.max_new_tokens,
        **_beams(task),  # beam answers never resume a greedy file, nor greedy ones a beam file
    }
    rank, size = launcher.world()
    files = RunPredictions(out, stem, settings)
    start = time.perf_counter()
    own = files.own(rank, size)
    own.resume()  # each process cleans its own file before any process reads it
    launcher.barrier()
    answered = files.answered()
    launcher.barrier()  # all have read the same answers before any process appends one
    done = [i for i in items if i.id in answered]
    mine = parallel.shard([i for i in items if i.id not in answered], rank, size)
    if not hasattr(pipeline, "batch") and mine:
        pipeline = pipeline()
    with own.appending(task) as append:  # `done` only feeds the progress bar's running score
        predict(pipeline, task, done + mine, batch_size, answered, append, progress and rank == 0)
    launcher.barrier()
    result = _finish(task, items, files, settings, skipped, start) if rank == 0 else None
    return launcher.from_rank0(result)


def _finish(
    task: Task, items: Sequence[Item], files: RunPredictions, settings: dict[str, Any], skipped: int, start: float
) -> dict[str, Any]:
    """Merge the predictions, score them once and write the results, submission and summary."""
    raw = files.merge(items)
    result = {**settings, "metric": task.metric, **summarise(task, items, raw)}
    result["counts"]["skipped_missing_images"] = skipped
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["paper"] = [vars(p) for p in task.paper]
    stem, out = f"{task.name}-{settings['split']}", files.out
    atomic_write_text(out / f"{stem}.results.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if task.submission is not None:
        answers = [task.clean(raw[i.id]) for i in items]
        atomic_write_text(out / f"{stem}.submission.json", json.dumps(task.submission(items, answers)) + "\n")
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*.results.json"))]
    atomic_write_text(out / "summary.md", summary_table(results))
    return result


# ----------------------------------------------------------------------------- reporting
def paper_cell(result: dict[str, Any]) -> str:
    """The paper's number for the run's split, or its number on another split, labelled."""
    papers = result.get("paper") or []
    same = [p for p in papers if p["split"] == result["split"]]
    if not papers:
        return "-"
    paper = (same or papers)[0]
    labels = ([] if same else [paper["split"]]) + ([paper["note"]] if paper["note"] else [])
    return f"{paper['value']}" + (f" ({', '.join(labels)})" if labels else "")


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per run, ours beside the paper's (x 100, as papers print)."""
    lines = ["| task | split | model | metric | ours | paper | questions |", "|---|---|---|---|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["task"], r["split"], r["model"])):
        value = r["scores"].get(r["metric"])
        ours = "-" if value is None else f"{100 * value:.2f}"
        lines.append(
            f"| {r['task']} | {r['split']} | {Path(r['model']).name} | {r['metric']} | {ours} "
            f"| {paper_cell(r)} | {r['counts']['scored']} |"
        )
    lines.append(
        "\nScores x 100 (CIDEr too, as papers print it). The paper's captioning numbers come from "
        "fine-tuned checkpoints; CIDEr on a subset (--limit) is not comparable to a full split."
    )
    return "\n".join(lines) + "\n"


def evaluate_shapes(
    pipeline: Any,
    n: int = DEFAULT_N,
    seed: int = HELDOUT_SEED,
    shuffle: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score a model on `n` held-out questions per type (of `types`, default all); see
    `runner.evaluate` for the result. `pipeline` is anything with `batch(requests, **gen) ->
    list[str]` (a `cogvlm.Pipeline`)."""
    items = shapes_items(n, seed, shuffle, types=types)
    return evaluate(pipeline, SHAPES, items, batch_size=batch_size, progress=progress)
