"""Referring expressions: RefCOCO, RefCOCO+ (UNC splits) and RefCOCOg (UMD splits), Acc@0.5.

One question per expression (not per object). Prompt: the grounding model's `base` template,
"Where is {expression}? answer in [[x0,y0,x1,y1]] format.", 128 new tokens. The first box of the
answer, scaled by the image's size from instances.json, must have IoU >= 0.5 with the object.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

from ...errors import CogVLMError
from ..metrics.grounding import grounding_hit, xywh_to_xyxy
from . import DOCS, Item, Paper, Task, layout, read_json

REC_PROMPT = "Where is {expression}? answer in [[x0,y0,x1,y1]] format."
MAX_NEW_TOKENS = 128


class _PlainData(pickle.Unpickler):
    """The refs files hold only dicts, lists, strings and numbers: refuse anything else (a
    pickle that names a class could run code)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_refs(path: Path) -> list:
    """A refs(unc).p / refs(umd).p file (pickled by Python 2), loaded as plain data."""
    if not path.is_file():
        raise CogVLMError(f"{path}: annotation file not found (expected layout: {DOCS})")
    try:
        with path.open("rb") as f:
            return _PlainData(f, encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CogVLMError(f"{path}: not a refs pickle ({str(e)[:100]})") from None


def score_grounding(item: Item, answer: str) -> float:
    """Acc@0.5 of one answer; the target is (box corners in pixels, image width, height)."""
    box, width, height = item.target
    return grounding_hit(answer, box, width, height)


def _loader(dataset: str, split_by: str) -> Callable[[Path, str], Iterator[Item]]:
    def load(data: Path, split: str) -> Iterator[Item]:
        refs_path = data / dataset / f"refs({split_by}).p"
        instances_path = data / dataset / "instances.json"
        refs = read_refs(refs_path)
        instances = read_json(instances_path)
        with layout(instances_path):
            boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
            images = {i["id"]: i for i in instances["images"]}
        with layout(refs_path):
            for ref in refs:
                if ref["split"] != split:
                    continue
                image = images[ref["image_id"]]
                target = (xywh_to_xyxy(boxes[ref["ann_id"]]), image["width"], image["height"])
                for sentence in ref["sentences"]:
                    yield Item(
                        id=str(sentence["sent_id"]),
                        image=data / "train2014" / image["file_name"],
                        query=REC_PROMPT.format(expression=sentence["sent"]),
                        target=target,
                    )

    return load


def _task(name: str, splits: tuple[str, ...], split_by: str, paper: tuple[float, ...]) -> Task:
    return Task(
        name=name,
        splits=splits,
        metric="Acc@0.5",
        template="base",
        prompt=REC_PROMPT,
        max_new_tokens=MAX_NEW_TOKENS,
        load=_loader(name, split_by),
        clean=str.strip,
        score=score_grounding,
        paper=tuple(Paper(s, v, "grounding-generalist v1.1") for s, v in zip(splits, paper)),
        files=f"{name}/refs({split_by}).p, {name}/instances.json, train2014/ images",
    )


TASKS = (
    _task("refcoco", ("val", "testA", "testB"), "unc", (92.76, 94.75, 88.99)),
    _task("refcoco+", ("val", "testA", "testB"), "unc", (88.68, 92.91, 83.39)),
    _task("refcocog", ("val", "test"), "umd", (89.75, 90.79)),
)
