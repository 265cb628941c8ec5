"""Benchmark tasks: each reads its official annotation files from a local folder into `Item`s.

A `Task` says how to ask (template, prompt, max_new_tokens), how to clean an answer and how to
score it: per question (`score`, a fraction in [0, 1]) or over the whole split (`corpus`,
captioning). Items whose `target` is None (test splits without public answers) are not scored;
a task with `submission` then writes the file its evaluation server takes. One module per
family; `registry()` collects them. Expected files per task: docs/eval.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import CogVLMError

DOCS = "docs/eval.md"


@dataclass(frozen=True)
class Item:
    """One question: its image (a path or a PIL image), the query text and what scores it."""

    id: str  # unique within the split; predictions are resumed by it
    image: Any
    query: str
    target: Any  # the task's ground truth; None where the split has no public answers
    kind: str = ""  # breakdown key: answer type, subject, domain...
    template: str | None = None  # None: the task's
    max_new_tokens: int | None = None  # None: the task's


@dataclass(frozen=True)
class Paper:
    """A number the CogVLM paper or README reports, on the scale papers print (x 100)."""

    split: str
    value: float
    note: str = ""


Scorer = Callable[[Item, str], float]
CorpusScorer = Callable[[Sequence[Item], Sequence[str]], tuple[dict[str, float], dict[str, float]]]


@dataclass(frozen=True)
class Task:
    """A benchmark: where its files are, how to prompt, clean and score."""

    name: str
    splits: tuple[str, ...]  # the first is the default
    metric: str  # name of the headline score
    template: str  # prompt template: base, chat or vqa
    prompt: str  # the query, with {placeholders}, as documented
    max_new_tokens: int
    clean: Callable[[str], str]
    load: Callable[[Path, str], Iterator[Item]] | None = None  # None: items are not read from files
    score: Scorer | None = None
    corpus: CorpusScorer | None = None
    submission: Callable[[Sequence[Item], Sequence[str]], Any] | None = None
    paper: tuple[Paper, ...] = ()
    skip_missing_images: bool = False  # OCR-VQA: some source URLs are dead
    files: str = ""  # one-line summary of the expected layout (for --list)
    num_beams: int = 1  # > 1: beam search (a captioning setting; 1 is greedy, as the official evals)


def registry() -> dict[str, Task]:
    """Every task by name (family modules are imported here, on first use)."""
    from . import captioning, gqa, ocrvqa, refcoco, scienceqa, shapes, tdiuc, visual7w, vqa

    families = (vqa, gqa, scienceqa, ocrvqa, tdiuc, captioning, refcoco, visual7w, shapes)
    return {t.name: t for module in families for t in module.TASKS}


def get_task(name: str) -> Task:
    tasks = registry()
    if name not in tasks:
        raise CogVLMError(f"unknown task '{name}' (cogvlm eval --list shows them)")
    return tasks[name]


# ----------------------------------------------------------------------------- loader helpers
def read_json(path: Path) -> Any:
    """A JSON annotation file, with a one-line error naming it when missing or malformed."""
    if not path.is_file():
        raise CogVLMError(f"{path}: annotation file not found (expected layout: {DOCS})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CogVLMError(f"{path}: not a valid JSON file ({str(e)[:100]})") from None


@contextlib.contextmanager
def layout(path: Path) -> Iterator[None]:
    """Turn a missing field or a wrong type while reading `path` into a one-line error."""
    try:
        yield
    except KeyError as e:
        raise CogVLMError(f"{path}: missing field {e} (expected layout: {DOCS})") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise CogVLMError(f"{path}: unexpected layout ({str(e)[:100]}; see {DOCS})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) read from an image file's header."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise CogVLMError(f"{path}: image not found (expected layout: {DOCS})") from None
    except OSError as e:
        raise CogVLMError(f"{path}: not a readable image ({str(e)[:100]})") from None


__all__ = ["Item", "Task", "Paper", "registry", "get_task", "read_json", "layout", "image_size"]
