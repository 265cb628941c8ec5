"""OCR-VQA (book covers): exact-match accuracy on the test split.

Prompt: the `vqa` template with the question, 32 new tokens (answers are titles and author
names). Scored by `ocrvqa_match`. Images come from Amazon URLs, some of them dead: questions
whose image is missing are skipped and counted in the results.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..metrics.choice import ocrvqa_match
from ..metrics.vqa import clean_short_answer
from . import Item, Paper, Task, layout, read_json

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


def load_ocrvqa(data: Path, split: str) -> Iterator[Item]:
    """dataset.json (a dict from image id); images in images/{image id}.jpg."""
    path = data / "dataset.json"
    with layout(path):
        for image_id, entry in read_json(path).items():
            if int(entry["split"]) != SPLIT_CODES[split]:
                continue
            for k, (question, answer) in enumerate(zip(entry["questions"], entry["answers"], strict=True)):
                yield Item(
                    id=f"{image_id}:{k}", image=data / "images" / f"{image_id}.jpg", query=question, target=answer
                )


def _score(item: Item, answer: str) -> float:
    return ocrvqa_match(answer, item.target)


TASKS = (
    Task(
        name="ocrvqa",
        splits=("test", "val"),
        metric="accuracy",
        template="vqa",
        prompt="{question}",
        max_new_tokens=32,
        load=load_ocrvqa,
        clean=clean_short_answer,
        score=_score,
        skip_missing_images=True,
        paper=(Paper("test", 73.8, "CogVLM-Chat, in its fine-tuning data"),),
        files="dataset.json, images/{image id}.jpg",
    ),
)
