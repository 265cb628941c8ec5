"""Visual7W pointing: pick the right one of 4 candidate boxes; multiple-choice accuracy.

CogVLM's exact pointing protocol is not published with the checkpoint; this harness states
its own: the `base` template with the question followed by the 4 candidates in CogVLM's box
notation (order shuffled per question with a fixed seed), 128 new tokens. The first box of the
answer is mapped to the candidate it overlaps most (`pointing_choice`); no box, or no overlap,
is wrong.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from ...grounding import format_box, pixel_to_normalised
from ..metrics.grounding import pointing_choice, xywh_to_xyxy
from . import Item, Paper, Task, image_size, layout, read_json

POINTING_PROMPT = "{question} Candidates: {candidates}. Answer in [[x0,y0,x1,y1]] format."


def load_visual7w(data: Path, split: str) -> Iterator[Item]:
    """dataset_v7w_pointing.json (images[] with qa_pairs[], boxes[]); images in images/{filename}."""
    path = data / "dataset_v7w_pointing.json"
    content = read_json(path)
    with layout(path):
        boxes = {b["box_id"]: xywh_to_xyxy((b["x"], b["y"], b["width"], b["height"])) for b in content["boxes"]}
        for image in content["images"]:
            if image["split"] != split:
                continue
            file = data / "images" / image["filename"]
            width, height = image_size(file)
            for qa in image["qa_pairs"]:
                ids = [qa["answer"], *qa["multiple_choices"]]
                random.Random(qa["qa_id"]).shuffle(ids)
                candidates = tuple(boxes[i] for i in ids)
                notation = ", ".join(format_box(pixel_to_normalised(c, width, height)) for c in candidates)
                yield Item(
                    id=str(qa["qa_id"]),
                    image=file,
                    query=POINTING_PROMPT.format(question=qa["question"], candidates=notation),
                    target=(candidates, ids.index(qa["answer"]), width, height),
                )


def _score(item: Item, answer: str) -> float:
    candidates, right, width, height = item.target
    return float(pointing_choice(answer, candidates, width, height) == right)


TASKS = (
    Task(
        name="visual7w",
        splits=("test", "val"),
        metric="accuracy",
        template="base",
        prompt=POINTING_PROMPT,
        max_new_tokens=128,
        load=load_visual7w,
        clean=str.strip,
        score=_score,
        paper=(Paper("test", 91.05, "grounding-generalist v1.1"),),
        files="dataset_v7w_pointing.json, images/{filename}",
    ),
)
