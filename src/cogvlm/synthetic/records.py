"""Question/answer records about a scene, in the training JSONL format.

`make_records` asks each requested task type about a scene (colour, shape, count, existence,
position, relation, caption, grounding, grounded caption, and grounding an absent shape). Varied
scenes (`Scene.look` set) get more wordings, negated and kind- or colour-only existence questions,
and may hold repeated names: questions that name one shape are asked only of shapes whose name is
unique in the scene. Records of plain scenes are exactly those of earlier releases.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .scene import COLORS, KINDS, Scene, Shape, format_box

TASKS: tuple[str, ...] = (
    "color",
    "shape",
    "count",
    "exist",
    "position",
    "relation",
    "caption",
    "ground",
    "ground_caption",
)
#: Tasks a mix may name beyond TASKS (the default pool, and the held-out `shapes` benchmark's types).
#: `caption_vqa` is the caption asked with the vqa template, as `cogvlm ask` asks "Describe the image."
ALL_TASKS: tuple[str, ...] = (*TASKS, "absent", "caption_vqa")
TEMPLATE_OF_TASK: dict[str, str] = {
    **{t: "vqa" for t in ("color", "shape", "count", "exist", "position", "relation")},
    "caption": "chat",
    "caption_vqa": "vqa",
    "ground": "base",
    "ground_caption": "base",
    "absent": "base",  # asked to ground a shape that is not there: "there is no ..." and no box
}


_PHRASES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the {k}?",
        "What is the color of the {k}?",
        "Which color does the {k} have?",
        "What colour is the {k} in the image?",
    ),
    "shape": (
        "What shape is the {c} object?",
        "What is the shape of the {c} object?",
        "Which shape is {c}?",
        "What kind of shape is the {c} one?",
    ),
    "count_all": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "How many shapes are in this picture?",
        "Count the shapes in the image.",
    ),
    "count_kind": ("How many {k}s are there?", "How many {k}s are in the image?", "Count the {k}s in the picture."),
    "count_color": (
        "How many {c} shapes are there?",
        "How many {c} objects are in the image?",
        "How many shapes are {c}?",
    ),
    "exist": ("Is there a {o}?", "Is there a {o} in the image?", "Does the image contain a {o}?", "Can you see a {o}?"),
    "position_x": (
        "Is the {o} on the left or the right?",
        "Is the {o} on the left side or the right side of the image?",
        "Which side is the {o} on, left or right?",
    ),
    "position_y": (
        "Is the {o} at the top or the bottom?",
        "Is the {o} in the top half or the bottom half of the image?",
        "Is the {o} near the top or the bottom?",
    ),
    "left": ("Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?", "Is the {a} on the left of the {b}?"),
    "right": (
        "Is the {a} right of the {b}?",
        "Is the {a} to the right of the {b}?",
        "Is the {a} on the right of the {b}?",
    ),
    "above": ("Is the {a} above the {b}?", "Is the {a} higher than the {b}?", "Is the {a} over the {b}?"),
    "below": ("Is the {a} below the {b}?", "Is the {a} lower than the {b}?", "Is the {a} under the {b}?"),
    "caption": (
        "Describe the image.",
        "What is in this picture?",
        "Describe this image briefly.",
        "What do you see in the image?",
        "List the objects in the image.",
    ),
    "ground": (
        "Where is the {o}?",
        "Can you point out the {o} in the image and provide the bounding boxes of its location?",
        "Where is the {o}? answer in [[x0,y0,x1,y1]] format.",
        "Find the {o} and give its bounding box.",
    ),
    "ground_caption": (
        "Can you provide a description of the image and include the coordinates "
        "[[x0,y0,x1,y1]] for each mentioned object?",
        "Describe the image and give the coordinates [[x0,y0,x1,y1]] of each object.",
        "Describe the image with a bounding box [[x0,y0,x1,y1]] for every object.",
    ),
}
#: Wordings varied scenes add to `_PHRASES` (and the question forms only they ask).
_MORE_PHRASES: dict[str, tuple[str, ...]] = {
    "color": (
        "What colour is the {k}?",
        "Tell me the color of the {k}.",
        "The {k} is what color?",
        "Which colour is the {k}?",
        "What color does the {k} have?",
    ),
    "shape": (
        "What is the {c} shape?",
        "What shape is the {c} thing?",
        "Name the shape that is {c}.",
        "What kind of shape is {c}?",
        "What is the {c} object?",
    ),
    "count_all": (
        "How many objects can you see?",
        "How many shapes do you see?",
        "What is the number of shapes?",
        "How many things are drawn?",
        "How many shapes are in the image?",
    ),
    "count_kind": ("How many {k}s can you see?", "What is the number of {k}s?", "How many {k}s do you see?"),
    "count_color": (
        "How many {c} objects can you see?",
        "How many {c} things are there?",
        "What is the number of {c} shapes?",
    ),
    "exist": ("Is there any {o}?", "Do you see a {o}?", "Is a {o} in the picture?", "Does the picture have a {o}?"),
    "exist_not": ("Is there no {o}?", "Is there no {o} in the image?", "Is the picture without a {o}?"),
    "exist_kind": ("Is there a {k}?", "Are there any {k}s?", "Is there a {k} in the image?", "Do you see a {k}?"),
    "exist_color": ("Is there anything {c}?", "Are there any {c} shapes?", "Is there a {c} shape?"),
    "left": ("Is the {a} left of the {b} in the image?", "Does the {a} lie to the left of the {b}?"),
    "right": ("Is the {a} right of the {b} in the image?", "Does the {a} lie to the right of the {b}?"),
    "above": ("Is the {a} higher up than the {b}?", "Is the {a} further up than the {b}?"),
    "below": ("Is the {a} further down than the {b}?", "Is the {a} beneath the {b}?"),
    "caption": (
        "Describe the picture.",
        "What objects are in the image?",
        "What shapes are in the picture?",
        "Give a short description of the image.",
        "Name all the shapes.",
    ),
    "ground": (
        "Where is the {o} in the image?",
        "Give the bounding box of the {o}.",
        "Locate the {o}.",
        "Show me the {o}.",
        "Find the {o}.",
    ),
}
_VARIED_PHRASES = {k: _PHRASES.get(k, ()) + _MORE_PHRASES.get(k, ()) for k in {*_PHRASES, *_MORE_PHRASES}}
POSITION_MARGIN = 0.08  # no position questions for centers this close (fraction of side) to the middle
RELATION_MARGIN = 0.10  # relations only when centers differ by at least this fraction of the side
RELATIONS = ("left", "right", "above", "below")  # x axis, then y axis


def check_relations(relations: Sequence[str]) -> None:
    """Refuse a `relations` option that is not a non-empty list of words from RELATIONS."""
    if isinstance(relations, str) or not relations or set(relations) - set(RELATIONS):
        raise ValueError(f"relations {relations}: use a list of one or more of {', '.join(RELATIONS)}")


def _ordered(scene: Scene) -> list[Shape]:
    """Canonical caption order: left to right by center x, then top to bottom."""
    return sorted(scene.shapes, key=lambda s: (s.center[0], s.center[1], s.color, s.kind))


def _phrase(shape: Shape) -> str:
    adj = "" if shape.size == "medium" else shape.size + " "
    return f"a {adj}{shape.color} {shape.kind}"


def _join(items: list[str]) -> str:
    if not items:
        return "nothing."
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return body + "."


def make_caption(scene: Scene, *, boxes: bool = False) -> str:
    """Canonical caption, e.g. ``"a red circle, a large blue star and a small green square."``."""
    return _join(
        [_phrase(s) + (format_box(s.box, scene.width, scene.height) if boxes else "") for s in _ordered(scene)]
    )


_CAPTION_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(KINDS) + r")s?\b")


def parse_caption_objects(text: str) -> set[tuple[str, str]]:
    """The (color, kind) pairs named in a caption (grounding boxes are ignored)."""
    return {(m.group(1), m.group(2)) for m in _CAPTION_RE.finditer(text.lower())}


def _once(shapes: Sequence[Shape], key: str) -> list[Shape]:
    """Shapes whose `key` ("kind", "color" or "name") no other shape in the scene shares."""
    return [s for s in shapes if sum(getattr(t, key) == getattr(s, key) for t in shapes) == 1]


def _color(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    once = _once(scene.shapes, "kind")
    if not once:
        return None
    s = rng.choice(once)
    return rng.choice(P["color"]).format(k=s.kind), s.color


def _shape(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    once = _once(scene.shapes, "color")
    if not once:
        return None
    s = rng.choice(once)
    return rng.choice(P["shape"]).format(c=s.color), s.kind


def _count(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    shapes = scene.shapes
    mode = rng.choice(("all", "kind", "color"))
    if mode == "all":
        return rng.choice(P["count_all"]), str(len(shapes))
    pool = scene.kinds if mode == "kind" else tuple(COLORS)  # sometimes absent, so "0" occurs
    value = getattr(rng.choice(shapes), mode) if shapes and rng.random() < 0.7 else rng.choice(pool)
    n = sum(getattr(s, mode) == value for s in shapes)
    return rng.choice(P["count_" + mode]).format(k=value, c=value), str(n)


def _absent_name(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (colour, kind) not in the scene; half the time one sharing a colour or kind with a shape."""
    present = {(s.color, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in COLORS for k in scene.kinds if (c, k) not in present]
    if scene.shapes and rng.random() < 0.5:  # hard negative
        ref = rng.choice(scene.shapes)
        absent = [p for p in absent if p[0] == ref.color or p[1] == ref.kind] or absent
    return rng.choice(absent)


def _exist(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str]:
    shapes = scene.shapes
    if scene.look is not None and rng.random() < 0.25:  # "is there a circle / anything red?"
        key = rng.choice(("kind", "color"))
        value = rng.choice(scene.kinds if key == "kind" else tuple(COLORS))
        found = any(getattr(s, key) == value for s in shapes)
        return rng.choice(P["exist_" + key]).format(k=value, c=value), "yes" if found else "no"
    present = {(s.color, s.kind) for s in shapes}
    if shapes and rng.random() < 0.5:
        (c, k), found = sorted(present)[rng.randrange(len(present))], True
    else:
        (c, k), found = _absent_name(scene, rng), False
    if scene.look is not None and rng.random() < 0.2:  # "is there no ...?": yes when there is none
        return rng.choice(P["exist_not"]).format(o=f"{c} {k}"), "no" if found else "yes"
    return rng.choice(P["exist"]).format(o=f"{c} {k}"), "yes" if found else "no"


def _position(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    sides = (scene.width, scene.height)
    ok = [
        (s, ax)
        for ax in rng.sample((0, 1), 2)
        for s in _once(scene.shapes, "name")
        if abs(s.center[ax] - sides[ax] / 2) >= POSITION_MARGIN * sides[ax]
    ]
    if not ok:
        return None
    s, ax = rng.choice([c for c in ok if c[1] == ok[0][1]])  # prefer the randomly chosen axis
    low = s.center[ax] < sides[ax] / 2
    ans = ("left" if low else "right") if ax == 0 else ("top" if low else "bottom")
    return rng.choice(P["position_" + "xy"[ax]]).format(o=s.name), ans


def _relation(
    scene: Scene, rng: random.Random, P: dict, relations: Sequence[str] = RELATIONS
) -> tuple[str, str] | None:
    named = _once(scene.shapes, "name")
    words = [tuple(w for w in pair if w in relations) for pair in (RELATIONS[:2], RELATIONS[2:])]  # per axis
    cands = [
        (a, b, ax)
        for a in named
        for b in named
        if a is not b
        for ax in (0, 1)
        if words[ax] and abs(a.center[ax] - b.center[ax]) >= RELATION_MARGIN * (scene.width, scene.height)[ax]
    ]
    if not cands:
        return None
    a, b, ax = rng.choice(cands)
    rel = rng.choice(words[ax])
    smaller = a.center[ax] < b.center[ax]
    yes = smaller if rel in ("left", "above") else not smaller
    return rng.choice(P[rel]).format(a=a.name, b=b.name), "yes" if yes else "no"


def _caption(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    return (rng.choice(P["caption"]), make_caption(scene)) if scene.shapes else None


def _ground(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    named = _once(scene.shapes, "name")
    if not named:
        return None
    s = rng.choice(named)
    return rng.choice(P["ground"]).format(o=s.name), f"the {s.name}{format_box(s.box, scene.width, scene.height)}"


def _absent(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str]:
    c, k = _absent_name(scene, rng)
    return rng.choice(P["ground"]).format(o=f"{c} {k}"), f"there is no {c} {k}."


def _ground_caption(scene: Scene, rng: random.Random, P: dict) -> tuple[str, str] | None:
    return (rng.choice(P["ground_caption"]), make_caption(scene, boxes=True)) if scene.shapes else None


_ASK = {
    "color": _color,
    "shape": _shape,
    "count": _count,
    "exist": _exist,
    "position": _position,
    "relation": _relation,
    "caption": _caption,
    "caption_vqa": _caption,
    "ground": _ground,
    "ground_caption": _ground_caption,
    "absent": _absent,
}


def _qa(scene: Scene, task: str, rng: random.Random, relations: Sequence[str] = RELATIONS) -> tuple[str, str] | None:
    """(question, answer) of one task type, or None if the scene cannot support it."""
    if task not in _ASK:
        raise ValueError(f"unknown task {task!r}; expected one of {ALL_TASKS}")
    extra = {"relations": relations} if task == "relation" else {}
    if scene.look is None:
        return _ASK[task](scene, rng, _PHRASES, **extra)
    qa = _ASK[task](scene, rng, _VARIED_PHRASES, **extra)
    return None if qa is None else (_articles(qa[0]), _articles(qa[1]))


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def _articles(text: str) -> str:
    """Write "an orange" for "a orange" (varied scenes only: plain records keep earlier releases' text)."""
    return _A_BEFORE_VOWEL.sub(r"\1n ", text)


def _more_turns(
    scene: Scene,
    rng: random.Random,
    pool: Sequence[str],
    first: tuple[str, str],
    turns: int,
    relations: Sequence[str] = RELATIONS,
) -> list[tuple[str, str]]:
    """`first` followed by up to ``turns - 1`` further vqa-template questions of random types
    from ``pool`` about the same scene, no question asked twice; with turns == 1 it draws nothing."""
    vqa = [t for t in pool if TEMPLATE_OF_TASK[t] == "vqa"]
    out, asked = [first], {first[0]}
    for _ in range(4 * (turns - 1)):  # a few spare draws replace repeats and unsupported types
        if len(out) == turns:
            break
        qa = _qa(scene, rng.choice(vqa), rng, relations)
        if qa is not None and qa[0] not in asked:
            out.append(qa)
            asked.add(qa[0])
    return out


def make_records(
    scene: Scene,
    rng: random.Random,
    image_path: str,
    tasks: Sequence[str] | None = None,
    per_scene: int = 3,
    turns: int = 1,
    relations: Sequence[str] = RELATIONS,
) -> list[dict]:
    """Up to ``per_scene`` records for one scene, each of a different task type (types repeat
    only when ``per_scene`` exceeds the number of requested tasks, or where ``tasks`` names a type
    more than once: repetition is how a mix weights a type).

    With ``turns`` > 1 a vqa record is a conversation of up to ``turns`` questions about its
    scene: one sequence then trains several answers for one image (the base template ignores
    history and the chat captions stay single-turn, so their records keep one turn). With
    ``turns`` == 1 the random draws, and so the records, are those of earlier releases.

    ``relations`` (a subset of RELATIONS) are the words relation questions use. "Is A left of B?" and
    "Is A right of B?" answer the same comparison with opposite words, an XOR no first-order signal
    leads to; a stage asking one word per axis first lets a small model learn the comparison."""
    pool = list(tasks) if tasks is not None else list(TASKS)
    for t in pool:
        if t not in ALL_TASKS:
            raise ValueError(f"unknown task {t!r}; expected one of {ALL_TASKS}")
    check_relations(relations)
    records: list[dict] = []
    order: list[str] = []
    while pool and len(order) < per_scene + len(pool):  # extra round replaces unsupported tasks
        order += rng.sample(pool, len(pool))
    for task in order:
        if len(records) >= per_scene:
            break
        qa = _qa(scene, task, rng, relations)
        if qa is None:
            continue
        qas = _more_turns(scene, rng, pool, qa, turns, relations) if TEMPLATE_OF_TASK[task] == "vqa" else [qa]
        records.append(
            {
                "image": image_path,
                "conversations": [
                    {"role": role, "content": text} for q, a in qas for role, text in (("user", q), ("assistant", a))
                ],
                "template_version": TEMPLATE_OF_TASK[task],
                "task": task,
            }
        )
    return records
