"""GQA: exact-match accuracy on test-dev balanced (the split papers quote).

Prompt: the `vqa` template with the question, 16 new tokens; scored by `gqa_match`, broken down
by the question's structural type (query, verify, logical, choose, compare).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..metrics.choice import gqa_match
from ..metrics.vqa import clean_short_answer
from . import Item, Task, layout, read_json


def load_gqa(data: Path, split: str) -> Iterator[Item]:
    """{split}_questions.json (a dict from question id); images in images/{imageId}.jpg."""
    path = data / f"{split}_questions.json"
    with layout(path):
        for qid, q in read_json(path).items():
            yield Item(
                id=str(qid),
                image=data / "images" / f"{q['imageId']}.jpg",
                query=q["question"],
                target=q.get("answer"),
                kind=q.get("types", {}).get("structural", ""),
            )


def _score(item: Item, answer: str) -> float:
    return gqa_match(answer, item.target)


def _submission(items: Sequence[Item], answers: Sequence[str]) -> list[dict]:
    """The GQA evaluation's predictions file: [{questionId, prediction}]."""
    return [{"questionId": i.id, "prediction": a} for i, a in zip(items, answers)]


TASKS = (
    Task(
        name="gqa",
        splits=("testdev_balanced", "val_balanced"),
        metric="accuracy",
        template="vqa",
        prompt="{question}",
        max_new_tokens=16,
        load=load_gqa,
        clean=clean_short_answer,
        score=_score,
        submission=_submission,
        files="{split}_questions.json, images/{imageId}.jpg",
    ),
)
