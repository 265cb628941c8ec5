"""The `shapes` task: held-out synthetic scenes for the project's tiny model (`cogvlm.synthetic`).

Questions come from scenes 0, 1, 2, ... of `iter_scenes(seed)` (default seed 999_999, never used
in training) until every question type has `n`; each is asked with its training template and
the scene rendered at 224 px (preprocessing resizes). Scores, per type:
- color, shape, count, exist, position, relation: exact match after lowercasing and removing
  punctuation;
- caption: the (color, kind) pairs the answer names (`parse_caption_objects`) equal the scene's;
- ground: the answer's first box has IoU >= 0.5 with the named shape's box;
- ground_caption: the fraction of the scene's shapes found, a shape being found when the first
  box whose phrase names its (color, kind) has IoU >= 0.5 with it.
With `shuffle`, each question gets the image of another scene (scene k -> the next scene used,
a fixed derangement): a model that reads the image then answers colour and shape at chance.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import SettingsError
from ...grounding import parse_boxes
from ...synthetic import TASKS as TYPES
from ...synthetic import TEMPLATE_OF_TASK, Scene, iter_scenes, parse_caption_objects
from ..metrics.grounding import IOU_THRESHOLD, box_iou, grounding_hit, to_pixels
from . import Item, Task

HELDOUT_SEED = 999_999
DEFAULT_N = 500  # questions per type
IMAGE_SIZE = 224
EXACT_TYPES = ("color", "shape", "count", "exist", "position", "relation")
MAX_NEW_TOKENS = {**{t: 10 for t in EXACT_TYPES}, "caption": 64, "ground": 48, "ground_caption": 160}
_SCENES_PER_QUESTION = 100  # give up (a type the generator cannot make) after n * this many scenes
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class ShapesTarget:
    """The recorded answer and the scene the question is about."""

    answer: str
    scene: Scene


def shapes_items(
    n: int,
    seed: int = HELDOUT_SEED,
    shuffle: bool = False,
    size: int = IMAGE_SIZE,
    types: Sequence[str] | None = None,
) -> list[Item]:
    """`n` questions of every type (or of `types` alone: the same questions as in the full set),
    grouped by type; with `shuffle`, images of other scenes."""
    if n < 1:
        raise SettingsError(f"n must be >= 1 (got {n})")
    unknown = sorted(set(types or ()) - set(TYPES))
    if unknown or types is not None and not types:
        named = ", ".join(unknown) or "none given"
        raise SettingsError(f"shapes question types: {named} (known: {', '.join(TYPES)})")
    picked: dict[str, list[tuple[int, int, dict]]] = {t: [] for t in TYPES if types is None or t in types}
    scenes: list[Scene] = []
    for index, (_, scene, records) in enumerate(
        iter_scenes(seed, n * _SCENES_PER_QUESTION, size, per_scene=len(TYPES))
    ):
        scenes.append(scene)
        for k, record in enumerate(records):
            if record["task"] in picked and len(picked[record["task"]]) < n:
                picked[record["task"]].append((index, k, record))
        if all(len(rows) == n for rows in picked.values()):
            break
    else:
        raise SettingsError(f"seed {seed}: could not make {n} questions of every type")
    used = sorted({index for rows in picked.values() for index, _, _ in rows})
    source = {i: i for i in used}
    if shuffle:
        if len(used) < 2:
            raise SettingsError("shuffled images need questions from at least two scenes")
        source = dict(zip(used, used[1:] + used[:1]))
    images = {i: scenes[i].render() for i in set(source.values())}
    items = []
    for kind, rows in picked.items():
        for index, k, record in rows:
            question, answer = (turn["content"] for turn in record["conversations"])
            items.append(
                Item(
                    id=f"{index}:{k}",
                    image=images[source[index]],
                    query=question,
                    target=ShapesTarget(answer, scenes[index]),
                    kind=kind,
                    template=TEMPLATE_OF_TASK[kind],
                    max_new_tokens=MAX_NEW_TOKENS[kind],
                )
            )
    return items


def _words(text: str) -> str:
    return " ".join(text.lower().translate(_NO_PUNCTUATION).split())


def ground_caption_recall(answer: str, scene: Scene) -> float:
    """Fraction of the scene's shapes whose first box named by phrase has IoU >= 0.5 with it."""
    boxes = parse_boxes(answer)
    found = 0
    for shape in scene.shapes:
        named = [b for b in boxes if (shape.color, shape.kind) in parse_caption_objects(b.label)]
        if named and box_iou(to_pixels(named[0].box, scene.width, scene.height), shape.box) >= IOU_THRESHOLD:
            found += 1
    return found / len(scene.shapes)


def score_shapes(item: Item, answer: str) -> float:
    """The score of one answer, by question type (see the module doc)."""
    truth: ShapesTarget = item.target
    scene = truth.scene
    if item.kind in EXACT_TYPES:
        return float(_words(answer) == _words(truth.answer))
    if item.kind == "caption":
        return float(parse_caption_objects(answer) == {(s.color, s.kind) for s in scene.shapes})
    if item.kind == "ground":
        (named,) = parse_caption_objects(truth.answer)  # the recorded answer names one shape
        shape = next(s for s in scene.shapes if (s.color, s.kind) == named)
        return grounding_hit(answer, shape.box, scene.width, scene.height)
    if item.kind == "ground_caption":
        return ground_caption_recall(answer, scene)
    raise ValueError(f"unknown shapes question type {item.kind!r}")


SHAPES = Task(
    name="shapes",
    splits=("heldout",),
    metric="accuracy",
    template="per type (vqa, chat, base)",
    prompt="the training questions of each type (cogvlm.synthetic)",
    max_new_tokens=10,
    clean=str.strip,
    score=score_shapes,
    files="none: scenes generated from --seed",
)
TASKS = (SHAPES,)
