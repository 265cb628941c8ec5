"""TDIUC (Task Driven Image Understanding Challenge): 12 question types, scored per type.

Files: the VQA format, one answer per question and a `question_type` in each annotation. Prompt:
the `vqa` template with the question, 16 new tokens; the answer is cleaned as the other short
answers. Scores (`tdiuc_scores`): simple accuracy (the headline here), arithmetic and harmonic
mean-per-type and their answer-normalised variants; per-type accuracy in the breakdown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ...errors import CogVLMError
from ..metrics.tdiuc import tdiuc_match, tdiuc_scores
from ..metrics.vqa import clean_short_answer
from . import Item, Paper, Task, layout, read_json

QUESTIONS = "Questions/OpenEnded_mscoco_{split}_questions.json"
ANNOTATIONS = "Annotations/mscoco_{split}_annotations.json"
IMAGE = "Images/{split}/COCO_{split}_{image_id:012d}.jpg"


def load_tdiuc(data: Path, split: str) -> Iterator[Item]:
    """Questions and annotations joined on question_id; target the one answer, kind the type."""
    qpath, apath = data / QUESTIONS.format(split=split), data / ANNOTATIONS.format(split=split)
    with layout(apath):
        truth = {a["question_id"]: a for a in read_json(apath)["annotations"]}
    with layout(qpath):
        for q in read_json(qpath)["questions"]:
            ann = truth.get(q["question_id"])
            if ann is None:
                raise CogVLMError(f"{apath}: no annotation for question {q['question_id']}")
            yield Item(
                id=str(q["question_id"]),
                image=data / IMAGE.format(split=split, image_id=int(q["image_id"])),
                query=q["question"],
                target=ann["answers"][0]["answer"],
                kind=ann["question_type"],
            )


def _score(item: Item, answer: str) -> float:
    return tdiuc_match(answer, item.target)


def _corpus(items: Sequence[Item], answers: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    return tdiuc_scores((i.kind, i.target, a) for i, a in zip(items, answers, strict=True))


TASKS = (
    Task(
        name="tdiuc",
        splits=("val2014", "train2014"),
        metric="accuracy",
        template="vqa",
        prompt="{question}",
        max_new_tokens=16,
        load=load_tdiuc,
        clean=clean_short_answer,
        score=_score,  # the running accuracy on the progress bar
        corpus=_corpus,
        paper=(Paper("val2014", 94.0, "checkpoint not named; the paper's appendix B"),),
        files=f"{QUESTIONS}, {ANNOTATIONS}, {IMAGE}",
    ),
)
