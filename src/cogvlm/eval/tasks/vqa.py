"""Open-ended VQA with 10 human answers: VQAv2, OK-VQA (official scorer), TextVQA, VizWiz (EvalAI).

Prompt: the `vqa` template, "Question: {question} Short answer:", greedy, 16 new tokens; the
answer is cleaned (first line, no "Answer:", no trailing period) and scored by `vqa_accuracy`.
Test splits have no public answers: their predictions go to a submission file for EvalAI.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable

from ..metrics.vqa import clean_short_answer, vqa_accuracy
from . import Item, Paper, Task, layout, read_json

QUESTION = "{question}"
VIZWIZ_QUESTION = "{question} When the provided information is insufficient, respond with 'unanswerable'."
MAX_NEW_TOKENS = 16


def _scorer(processor: str) -> Callable[[Item, str], float]:
    def score(item: Item, answer: str) -> float:
        return vqa_accuracy(answer, item.target, processor)

    return score


def _by_question_id(items: Sequence[Item], answers: Sequence[str]) -> list[dict]:
    """The EvalAI results file of VQAv2 and TextVQA: [{question_id, answer}]."""
    return [{"question_id": int(i.id), "answer": a} for i, a in zip(items, answers)]


def _coco_vqa(questions: str, annotations: str) -> Callable[[Path, str], Iterator[Item]]:
    """Loader of the VQAv2 file format (also OK-VQA's): questions and annotations files named
    from the split, images in <image folder>/COCO_<image folder>_<12-digit id>.jpg."""

    def load(data: Path, split: str) -> Iterator[Item]:
        qpath = data / questions.format(split=split)
        apath = data / annotations.format(split=split)
        truth: dict[int, dict] = {}
        if not split.startswith("test"):  # test splits are scored by EvalAI only
            with layout(apath):
                truth = {a["question_id"]: a for a in read_json(apath)["annotations"]}
        folder = "test2015" if split.startswith("test") else split
        with layout(qpath):
            for q in read_json(qpath)["questions"]:
                ann = truth[q["question_id"]] if truth else None
                yield Item(
                    id=str(q["question_id"]),
                    image=data / folder / f"COCO_{folder}_{int(q['image_id']):012d}.jpg",
                    query=QUESTION.format(question=q["question"]),
                    target=[a["answer"] for a in ann["answers"]] if ann else None,
                    kind=ann["answer_type"] if ann else "",
                )

    return load


def load_textvqa(data: Path, split: str) -> Iterator[Item]:
    """TextVQA_0.5.1_{split}.json; images in train_images/ (train and val) or test_images/."""
    path = data / f"TextVQA_0.5.1_{split}.json"
    folder = "test_images" if split == "test" else "train_images"
    with layout(path):
        for q in read_json(path)["data"]:
            yield Item(
                id=str(q["question_id"]),
                image=data / folder / f"{q['image_id']}.jpg",
                query=QUESTION.format(question=q["question"]),
                target=q.get("answers"),
            )


def load_vizwiz(data: Path, split: str) -> Iterator[Item]:
    """Annotations/{split}.json (a list); images in {split}/."""
    path = data / "Annotations" / f"{split}.json"
    with layout(path):
        for q in read_json(path):
            answers = q.get("answers")
            yield Item(
                id=q["image"],
                image=data / split / q["image"],
                query=VIZWIZ_QUESTION.format(question=q["question"]),
                target=[a["answer"] for a in answers] if answers else None,
                kind=q.get("answer_type", ""),
            )


def _vizwiz_submission(items: Sequence[Item], answers: Sequence[str]) -> list[dict]:
    return [{"image": i.id, "answer": a} for i, a in zip(items, answers)]


def _task(
    name: str,
    splits: tuple[str, ...],
    processor: str,
    load,
    files: str,
    *,
    prompt: str = QUESTION,
    submission=_by_question_id,
    paper: tuple[Paper, ...] = (),
) -> Task:
    return Task(
        name=name,
        splits=splits,
        metric="VQA accuracy",
        template="vqa",
        prompt=prompt,
        max_new_tokens=MAX_NEW_TOKENS,
        load=load,
        clean=clean_short_answer,
        score=_scorer(processor),
        submission=submission,
        paper=paper,
        files=files,
    )


TASKS = (
    _task(
        "vqav2",
        ("val2014", "test-dev2015", "test2015"),
        "official",
        _coco_vqa("v2_OpenEnded_mscoco_{split}_questions.json", "v2_mscoco_{split}_annotations.json"),
        "v2_OpenEnded_mscoco_{split}_questions.json, v2_mscoco_{split}_annotations.json, val2014/ or test2015/ images",
        paper=(Paper("test-dev2015", 82.3, "CogVLM-Chat, in its fine-tuning data"),),
    ),
    _task(
        "okvqa",
        ("val2014",),
        "official",
        _coco_vqa("OpenEnded_mscoco_{split}_questions.json", "mscoco_{split}_annotations.json"),
        "OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json, val2014/ images",
        submission=None,
        paper=(Paper("val2014", 64.8, "CogVLM-Chat, in its fine-tuning data"),),
    ),
    _task(
        "textvqa",
        ("val", "test"),
        "evalai",
        load_textvqa,
        "TextVQA_0.5.1_{split}.json, train_images/ or test_images/",
        paper=(Paper("val", 70.4, "CogVLM-Chat, in its fine-tuning data"),),
    ),
    _task(
        "vizwiz",
        ("val", "test"),
        "evalai",
        load_vizwiz,
        "Annotations/{split}.json, {split}/ images",
        prompt=VIZWIZ_QUESTION,
        submission=_vizwiz_submission,
    ),
)
