"""Synthetic shape scenes and question/answer records for training a tiny CogVLM.

Everything is derived deterministically from a seed so that a model can be trained
and evaluated on CPU without downloads: `make_scene` draws a few coloured shapes on a
light background, `make_records` turns a scene into VQA / chat / grounding records in
the training JSONL format, and `write_dataset` / `iter_samples` produce whole datasets.
Scene ``i`` of seed ``s`` always comes from ``random.Random(f"{s}:{i}")``.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import grounding
from .fileio import atomic_write_bytes

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (120, 70, 25),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
KINDS: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "star")
MAX_SHAPES = 4  # per scene
COLOR_JITTER = 16  # per channel, on top of the named colour (see Scene.shape_rgb)
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.22, "large": 0.32}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "beige": (245, 240, 225),
    "blue-gray": (228, 234, 242),
}
TEXTURES: tuple[str, ...] = ("plain", "noise", "stripes", "grid")
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
TEMPLATE_OF_TASK: dict[str, str] = {
    **{t: "vqa" for t in ("color", "shape", "count", "exist", "position", "relation")},
    "caption": "chat",
    "ground": "base",
    "ground_caption": "base",
}

# Unit 5-pointed star (top point up), used scaled to fill a shape's box exactly.
_STAR_INNER = 0.45
_STAR = [
    (
        (1.0 if i % 2 == 0 else _STAR_INNER) * math.cos(-math.pi / 2 + i * math.pi / 5),
        (1.0 if i % 2 == 0 else _STAR_INNER) * math.sin(-math.pi / 2 + i * math.pi / 5),
    )
    for i in range(10)
]
_STAR_X = (min(p[0] for p in _STAR), max(p[0] for p in _STAR))
_STAR_Y = (min(p[1] for p in _STAR), max(p[1] for p in _STAR))


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``box`` is the tight pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    kind: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """Unambiguous reference within a scene, e.g. ``"red circle"``."""
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A rendered-on-demand scene; ``texture_seed`` makes noisy/striped backgrounds reproducible."""

    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]
    texture_seed: int = 0

    def render(self) -> Image.Image:
        """Draw the scene as an RGB image (pure function of the dataclass fields)."""
        base, _, texture = self.background.partition(" ")
        rgb = np.empty((self.height, self.width, 3), dtype=np.int16)
        rgb[:] = BACKGROUNDS[base]
        rs = np.random.RandomState(self.texture_seed)
        if texture == "noise":
            rgb += rs.randint(-8, 9, size=(self.height, self.width, 1)).astype(np.int16)
        elif texture in ("stripes", "grid"):
            period = 8 + int(rs.randint(0, 8))
            vertical = bool(rs.randint(0, 2))
            if texture == "grid" or vertical:
                rgb[:, ::period] -= 16
            if texture == "grid" or not vertical:
                rgb[::period, :] -= 16
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for i, shape in enumerate(self.shapes):
            _draw_shape(draw, shape.kind, shape.box, self.shape_rgb(i))
        return img

    def shape_rgb(self, i: int) -> tuple[int, int, int]:
        """Shape i's fill: its named colour moved by up to COLOR_JITTER per channel, so a model
        learns colour names rather than eight exact RGB values."""
        rs = np.random.RandomState((self.texture_seed + 7919 * (i + 1)) % 2**32)
        jitter = rs.randint(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        return tuple(int(v) for v in np.clip(np.array(COLORS[self.shapes[i].color]) + jitter, 0, 255))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw ``kind`` so that its pixels exactly fill ``box`` (exclusive x1/y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - 1 - x0, y1 - 1 - y0
    if kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind in ("square", "rectangle"):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), (x0 + w / 2, y0)], fill=fill)
    elif kind == "star":
        pts = [
            (
                x0 + (px - _STAR_X[0]) / (_STAR_X[1] - _STAR_X[0]) * w,
                y0 + (py - _STAR_Y[0]) / (_STAR_Y[1] - _STAR_Y[0]) * h,
            )
            for px, py in _STAR
        ]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _box_dims(kind: str, extent: int, rng: random.Random) -> tuple[int, int]:
    """Width/height of a shape's box for a given extent (longest side)."""
    if kind == "rectangle":
        short = max(3, round(extent / 2))
        return (extent, short) if rng.random() < 0.5 else (short, extent)
    if kind == "triangle":
        return extent, max(3, round(extent * 0.87))
    if kind == "star":
        return extent, max(3, round(extent * 0.95))
    return extent, extent


def _overlaps(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def make_scene(
    rng: random.Random, size: int = 224, *, min_shapes: int = 1, max_shapes: int = MAX_SHAPES, easy: bool = False
) -> Scene:
    """Random scene of min_shapes-max_shapes non-overlapping shapes, unique (color, kind) pairs.

    ``easy`` gives 1-2 large shapes on plain white (curriculum warm-up). Shapes that cannot be
    placed without overlap after several tries are dropped, so a scene may have fewer shapes.
    """
    if easy:
        n, background = rng.randint(1, 2), "white"
    else:
        n = rng.randint(min_shapes, max_shapes)
        base = rng.choice(sorted(BACKGROUNDS))
        texture = rng.choice(TEXTURES)
        background = base if texture == "plain" else f"{base} {texture}"
    texture_seed = rng.randrange(2**31)
    pairs = rng.sample([(c, k) for c in COLORS for k in KINDS], n)
    border, margin = max(2, size // 50), max(3, size // 40)
    shapes: list[Shape] = []
    for color, kind in pairs:
        size_name = "large" if easy else rng.choice(tuple(SIZES))
        extent = max(6, round(SIZES[size_name] * size * rng.uniform(0.95, 1.05)))
        w, h = _box_dims(kind, extent, rng)
        if w > size - 2 * border or h > size - 2 * border:
            continue
        for _ in range(60):
            x0 = rng.randint(border, size - border - w)
            y0 = rng.randint(border, size - border - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _overlaps(box, s.box, margin) for s in shapes):
                shapes.append(Shape(kind, color, size_name, box, (x0 + w / 2, y0 + h / 2)))
                break
    return Scene(size, size, background, tuple(shapes), texture_seed)


def scene_to_dict(scene: Scene) -> dict:
    """JSON-friendly ground truth of a scene (as written to scenes.jsonl)."""
    return {
        "width": scene.width,
        "height": scene.height,
        "background": scene.background,
        "texture_seed": scene.texture_seed,
        "shapes": [
            {"kind": s.kind, "color": s.color, "size": s.size, "box": list(s.box), "center": list(s.center)}
            for s in scene.shapes
        ],
    }


def scene_from_dict(d: dict) -> Scene:
    """Inverse of `scene_to_dict`."""
    shapes = tuple(Shape(s["kind"], s["color"], s["size"], tuple(s["box"]), tuple(s["center"])) for s in d["shapes"])
    return Scene(d["width"], d["height"], d["background"], shapes, d.get("texture_seed", 0))


def format_box(box_px: Sequence[float], width: int, height: int) -> str:
    """Official grounding notation of a pixel box: ``[[x0,y0,x1,y1]]`` in 000-999."""
    return grounding.format_box(grounding.pixel_to_normalised(tuple(box_px), width, height))


# ----------------------------------------------------------------------------- records
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
POSITION_MARGIN = 0.08  # no position questions for centers this close (fraction of side) to the middle
RELATION_MARGIN = 0.10  # relations only when centers differ by at least this fraction of the side


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


def _qa(scene: Scene, task: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of one task type, or None if the scene cannot support it."""
    shapes, P = scene.shapes, _PHRASES
    if task == "color":
        once = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        if not once:
            return None
        s = rng.choice(once)
        return rng.choice(P["color"]).format(k=s.kind), s.color
    if task == "shape":
        once = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
        if not once:
            return None
        s = rng.choice(once)
        return rng.choice(P["shape"]).format(c=s.color), s.kind
    if task == "count":
        mode = rng.choice(("all", "kind", "color"))
        if mode == "all":
            return rng.choice(P["count_all"]), str(len(shapes))
        pool = KINDS if mode == "kind" else tuple(COLORS)  # sometimes absent, so "0" occurs
        value = getattr(rng.choice(shapes), mode) if shapes and rng.random() < 0.7 else rng.choice(pool)
        n = sum(getattr(s, mode) == value for s in shapes)
        return rng.choice(P["count_" + mode]).format(k=value, c=value), str(n)
    if task == "exist":
        present = {(s.color, s.kind) for s in shapes}
        if shapes and rng.random() < 0.5:
            (c, k), ans = sorted(present)[rng.randrange(len(present))], "yes"
        else:
            absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
            if shapes and rng.random() < 0.5:  # hard negative: shares colour or kind with a shape
                ref = rng.choice(shapes)
                absent = [p for p in absent if p[0] == ref.color or p[1] == ref.kind] or absent
            (c, k), ans = rng.choice(absent), "no"
        return rng.choice(P["exist"]).format(o=f"{c} {k}"), ans
    if task == "position":
        sides = (scene.width, scene.height)
        ok = [
            (s, ax)
            for ax in rng.sample((0, 1), 2)
            for s in shapes
            if abs(s.center[ax] - sides[ax] / 2) >= POSITION_MARGIN * sides[ax]
        ]
        if not ok:
            return None
        s, ax = rng.choice([c for c in ok if c[1] == ok[0][1]])  # prefer the randomly chosen axis
        low = s.center[ax] < sides[ax] / 2
        ans = ("left" if low else "right") if ax == 0 else ("top" if low else "bottom")
        return rng.choice(P["position_" + "xy"[ax]]).format(o=s.name), ans
    if task == "relation":
        cands = [
            (a, b, ax)
            for a in shapes
            for b in shapes
            if a is not b
            for ax in (0, 1)
            if abs(a.center[ax] - b.center[ax]) >= RELATION_MARGIN * (scene.width, scene.height)[ax]
        ]
        if not cands:
            return None
        a, b, ax = rng.choice(cands)
        rel = rng.choice(("left", "right") if ax == 0 else ("above", "below"))
        smaller = a.center[ax] < b.center[ax]
        yes = smaller if rel in ("left", "above") else not smaller
        return rng.choice(P[rel]).format(a=a.name, b=b.name), "yes" if yes else "no"
    if task == "caption":
        return (rng.choice(P["caption"]), make_caption(scene)) if shapes else None
    if task == "ground":
        if not shapes:
            return None
        s = rng.choice(shapes)
        return (rng.choice(P["ground"]).format(o=s.name), f"the {s.name}{format_box(s.box, scene.width, scene.height)}")
    if task == "ground_caption":
        return (rng.choice(P["ground_caption"]), make_caption(scene, boxes=True)) if shapes else None
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _more_turns(
    scene: Scene, rng: random.Random, pool: Sequence[str], first: tuple[str, str], turns: int
) -> list[tuple[str, str]]:
    """`first` followed by up to ``turns - 1`` further vqa-template questions of random types
    from ``pool`` about the same scene, no question asked twice; with turns == 1 it draws nothing."""
    vqa = [t for t in pool if TEMPLATE_OF_TASK[t] == "vqa"]
    out, asked = [first], {first[0]}
    for _ in range(4 * (turns - 1)):  # a few spare draws replace repeats and unsupported types
        if len(out) == turns:
            break
        qa = _qa(scene, rng.choice(vqa), rng)
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
) -> list[dict]:
    """Up to ``per_scene`` records for one scene, each of a different task type (types repeat
    only when ``per_scene`` exceeds the number of requested tasks, or where ``tasks`` names a type
    more than once: repetition is how a mix weights a type).

    With ``turns`` > 1 a vqa record is a conversation of up to ``turns`` questions about its
    scene: one sequence then trains several answers for one image (the base template ignores
    history and the chat captions stay single-turn, so their records keep one turn). With
    ``turns`` == 1 the random draws, and so the records, are those of earlier releases."""
    pool = list(tasks) if tasks is not None else list(TASKS)
    for t in pool:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected one of {TASKS}")
    records: list[dict] = []
    order: list[str] = []
    while pool and len(order) < per_scene + len(pool):  # extra round replaces unsupported tasks
        order += rng.sample(pool, len(pool))
    for task in order:
        if len(records) >= per_scene:
            break
        qa = _qa(scene, task, rng)
        if qa is None:
            continue
        qas = _more_turns(scene, rng, pool, qa, turns) if TEMPLATE_OF_TASK[task] == "vqa" else [qa]
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


# ----------------------------------------------------------------------------- datasets
def _scene_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


def iter_scenes(
    seed: int,
    n: int,
    size: int = 224,
    tasks: Sequence[str] | None = None,
    easy: bool = False,
    per_scene: int = 3,
    turns: int = 1,
) -> Iterator[tuple[str, Scene, list[dict]]]:
    """Yield (image path, scene, records) for scenes 0..n-1; scene i depends only on (seed, i)."""
    for i in range(n):
        rng = _scene_rng(seed, i)
        scene = make_scene(rng, size, easy=easy)
        path = f"images/{i:06d}.png"
        yield path, scene, make_records(scene, rng, path, tasks, per_scene, turns)


def iter_samples(
    seed: int,
    n: int,
    size: int = 224,
    tasks: Sequence[str] | None = None,
    easy: bool = False,
    per_scene: int = 3,
    turns: int = 1,
) -> Iterator[tuple[Image.Image, dict]]:
    """In-memory (image, record) pairs for on-the-fly training and evaluation.

    Records of one scene share one PIL image object; copy it before mutating.
    """
    for _, scene, records in iter_scenes(seed, n, size, tasks, easy, per_scene, turns):
        image = scene.render()
        for record in records:
            yield image, record


def corpus(seed: int, n: int) -> Iterator[str]:
    """Every prompt (as its template writes it) and answer of n scenes: text to train a tokenizer."""
    from .prompts import format_prompt

    for _, _, records in iter_scenes(seed, n, tasks=TASKS, per_scene=len(TASKS)):
        for record in records:
            question, answer = (turn["content"] for turn in record["conversations"])
            yield format_prompt(question, None, record["template_version"])
            yield answer


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    size: int = 224,
    tasks: Sequence[str] | None = None,
    easy: bool = False,
    per_scene: int = 3,
    turns: int = 1,
) -> Path:
    """Write ``images/NNNNNN.png``, ``data.jsonl`` (records) and ``scenes.jsonl`` (ground truth).

    Every file is written atomically; the same arguments give byte-identical output.
    Returns the path of data.jsonl.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    data_lines, scene_lines = [], []
    for path, scene, records in iter_scenes(seed, n, size, tasks, easy, per_scene, turns):
        buf = io.BytesIO()
        scene.render().save(buf, format="PNG")
        atomic_write_bytes(out / path, buf.getvalue())
        data_lines += [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
        scene_lines.append(json.dumps({"image": path, **scene_to_dict(scene)}, sort_keys=True) + "\n")
    atomic_write_bytes(out / "scenes.jsonl", "".join(scene_lines).encode("utf-8"))
    atomic_write_bytes(out / "data.jsonl", "".join(data_lines).encode("utf-8"))
    return out / "data.jsonl"
