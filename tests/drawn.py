"""Pictures a new user draws with plain PIL calls, questions about them, and how to score the answers.

Independent of `cogvlm.synthetic` on purpose: its own renderings of the model's colour names (PIL's
named colours), its own sizes, positions, backgrounds (white, black, dark grey, navy, pastel,
gradients drawn line by line, light noise), canvases (224 x 224 to 640 x 480, landscape and
portrait), outlines, anti-aliasing (drawn 4x larger and downsampled, a common PIL idiom), JPEG,
and its own wordings. Rectangles and ellipses are at least twice as long as wide, and canvases
within 3:4 and 4:3, so that a square stays tellable from a rectangle after the model's square
resize. Run it as a script for the full table: `python tests/drawn.py --n 300`.
"""

from __future__ import annotations

import io
import math
import random
import re
import string
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageDraw

#: The model's colour names, each drawn as one of these PIL colours.
COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "firebrick"),
    "green": ("green", "forestgreen", "limegreen"),
    "blue": ("blue", "royalblue", "mediumblue"),
    "yellow": ("yellow", "gold"),
    "black": ("black",),
    "gray": ("gray", "darkgray", "dimgray"),
    "teal": ("teal", "darkcyan"),
    "brown": ("brown", "saddlebrown", "sienna"),
    "purple": ("purple", "darkviolet", "rebeccapurple"),
    "orange": ("orange", "darkorange"),
}
KINDS = ("circle", "ellipse", "square", "rectangle", "triangle", "star")
CANVASES = ((224, 224), (320, 240), (640, 480), (300, 400), (500, 500), (256, 192), (400, 300), (240, 320))
PLAIN_BACKGROUNDS = ("white", "white", "whitesmoke", "black", "#303030", "navy", "lavender", "lightyellow", "beige")
MIN_CONTRAST = 120.0
TYPES = ("color", "shape", "count", "exist_yes", "exist_no", "relation", "ground", "absent", "caption")
#: The template each type is asked with: what `cogvlm ask` (vqa, the default) and `cogvlm ground` (base) use.
TEMPLATE = {**{t: "vqa" for t in TYPES}, "ground": "base", "absent": "base"}


@dataclass(frozen=True)
class Drawn:
    """A drawn shape: its colour name, kind and tight pixel box (x0, y0, x1, y1), x1/y1 exclusive."""

    color: str
    kind: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Question:
    """One question about one picture, with what a correct answer must be (`expect`)."""

    image: Image.Image
    type: str
    query: str
    expect: object  # a word, a count, a box in pixels, None (absent) or the multiset of names (caption)
    shapes: tuple[Drawn, ...]


def _rgb(name: str) -> tuple[int, int, int]:
    return ImageColor.getrgb(name)[:3]


def _background(rng: random.Random, width: int, height: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """A plain PIL-named colour, or a top-to-bottom gradient drawn line by line; light noise sometimes."""
    if rng.random() < 0.25:
        top = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        bottom = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        image = Image.new("RGB", (width, height))
        draw = ImageDraw.Draw(image)
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line([(0, y), (width, y)], fill=tuple(round(a + t * (b - a)) for a, b in zip(top, bottom)))
        colours = [top, bottom]
    else:
        name = rng.choice(PLAIN_BACKGROUNDS)
        image, colours = Image.new("RGB", (width, height), name), [_rgb(name)]
    if rng.random() < 0.25:  # light noise: PIL's Gaussian noise image blended in
        noise = Image.effect_noise((width, height), rng.uniform(20, 50)).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.04, 0.1))
    return image, colours


def _points(kind: str, box: tuple[int, int, int, int], flip: bool) -> list[tuple[float, float]]:
    """Polygon corners of a triangle or five-pointed star filling box."""
    x0, y0, x1, y1 = box
    if kind == "triangle":
        top, base = (y1, y0) if flip else (y0, y1)
        return [((x0 + x1) / 2, top), (x1, base), (x0, base)]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [
        (
            cx + (1 if i % 2 == 0 else 0.42) * rx * math.cos(math.radians(-90 + 36 * i)),
            cy + (1 if i % 2 == 0 else 0.42) * ry * math.sin(math.radians(-90 + 36 * i)),
        )
        for i in range(10)
    ]


def _draw(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill, width: int, flip: bool) -> None:
    paint = {"fill": fill} if width == 0 else {"outline": fill, "width": width}
    x0, y0, x1, y1 = box
    if kind in ("circle", "ellipse"):
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), **paint)
    elif kind in ("square", "rectangle"):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), **paint)
    else:
        draw.polygon(_points(kind, (x0, y0, x1 - 1, y1 - 1), flip), **paint)


def _size(kind: str, side: int, rng: random.Random, most: float) -> tuple[int, int]:
    long = round(side * rng.uniform(0.1, most))
    if kind in ("rectangle", "ellipse"):
        short = round(long / rng.uniform(2.0, 3.0))
        return (long, short) if rng.random() < 0.5 else (short, long)
    return long, long


def draw_picture(rng: random.Random, names: list[tuple[str, str]]) -> tuple[Image.Image, tuple[Drawn, ...]]:
    """A canvas with the named shapes, apart from each other; a name that does not fit is left out."""
    width, height = rng.choice(CANVASES)
    image, backdrop = _background(rng, width, height)
    side, scale = min(width, height), 4 if rng.random() < 0.4 else 1
    outlined = rng.random() < 0.25
    most = {1: 0.6, 2: 0.4}.get(len(names), 0.3)
    layer = image.resize((width * scale, height * scale)) if scale > 1 else image
    draw, placed = ImageDraw.Draw(layer), []
    for color, kind in names:
        fill = rng.choice(COLOURS[color])
        if min(math.dist(_rgb(fill), b) for b in backdrop) < MIN_CONTRAST:
            continue
        w, h = _size(kind, side, rng, most)
        for _ in range(100):
            x0, y0 = rng.randint(4, width - 4 - w), rng.randint(4, height - 4 - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_apart(box, d.box, side // 25) for d in placed):
                line = max(2, round(side * 0.015)) if outlined and min(w, h) > 12 else 0
                _draw(draw, kind, tuple(v * scale for v in box), fill, line * scale, rng.random() < 0.3)
                placed.append(Drawn(color, kind, box))
                break
    if scale > 1:
        image = layer.resize((width, height), Image.LANCZOS)
    if rng.random() < 0.25:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=rng.randint(60, 90))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image, tuple(placed)


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _names(rng: random.Random) -> list[tuple[str, str]]:
    """1-5 shapes; a third of the pictures repeat one name (three yellow circles), others share colours."""
    n = rng.randint(1, 5)
    if rng.random() < 0.33:
        repeated = (rng.choice(list(COLOURS)), rng.choice(KINDS))
        return [repeated] * n
    return [(rng.choice(list(COLOURS)), rng.choice(KINDS)) for _ in range(n)]


def _unique(shapes: tuple[Drawn, ...], key) -> list[Drawn]:
    return [s for s in shapes if sum(key(t) == key(s) for t in shapes) == 1]


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _absent(rng: random.Random, shapes: tuple[Drawn, ...]) -> str:
    present = {s.name for s in shapes}
    pool = [f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in present]
    near = [n for n in pool if shapes and any(n.split()[0] == s.color or n.split()[1] == s.kind for s in shapes)]
    return rng.choice(near if near and rng.random() < 0.5 else pool)


def ask(rng: random.Random, kind: str, image: Image.Image, shapes: tuple[Drawn, ...]) -> Question | None:
    """A question of one type about the picture, or None when the picture cannot carry one."""
    q = lambda query, expect: Question(image, kind, query, expect, shapes)  # noqa: E731
    if kind == "color":
        one = _unique(shapes, lambda s: s.kind)
        s = rng.choice(one) if one else None
        wording = ("What color is the {}?", "Which colour is the {}?", "What is the colour of the {}?")
        return s and q(rng.choice(wording).format(s.kind), s.color)
    if kind == "shape":
        one = _unique(shapes, lambda s: s.color)
        s = rng.choice(one) if one else None
        wording = ("What shape is the {} one?", "What is the {} shape?", "Which shape is {}?")
        return s and q(rng.choice(wording).format(s.color), s.kind)
    if kind == "count":
        mode = rng.choice(("all", "kind", "color"))
        if mode == "all":
            return q(rng.choice(("How many shapes are there?", "How many shapes can you see?")), len(shapes))
        value = rng.choice([s.kind if mode == "kind" else s.color for s in shapes]) if shapes else None
        if value is None:
            return None
        n = sum((s.kind if mode == "kind" else s.color) == value for s in shapes)
        return q(f"How many {value}s are there?" if mode == "kind" else f"How many {value} shapes are there?", n)
    if kind in ("exist_yes", "exist_no"):
        name = rng.choice(shapes).name if kind == "exist_yes" and shapes else _absent(rng, shapes)
        wording = ("Is there {} in the image?", "Is there {}?", "Can you see {}?")
        return q(rng.choice(wording).format(_an(name)), "yes" if kind == "exist_yes" else "no")
    if kind == "relation":
        one, pairs = _unique(shapes, lambda s: s.name), []
        w, h = image.size
        for a in one:
            for b in one:
                if a is not b and abs(a.center[0] - b.center[0]) >= 0.15 * w:
                    pairs += [
                        (a, b, "left of", a.center[0] < b.center[0]),
                        (a, b, "right of", a.center[0] > b.center[0]),
                    ]
                if a is not b and abs(a.center[1] - b.center[1]) >= 0.15 * h:
                    pairs += [(a, b, "above", a.center[1] < b.center[1]), (a, b, "below", a.center[1] > b.center[1])]
        if not pairs:
            return None
        a, b, rel, yes = rng.choice(pairs)
        return q(f"Is the {a.name} {rel} the {b.name}?", "yes" if yes else "no")
    if kind == "ground":
        one = _unique(shapes, lambda s: s.name)
        s = rng.choice(one) if one else None
        return s and q(rng.choice(("Where is the {}?", "Find the {}.")).format(s.name), s.box)
    if kind == "absent":
        return q(rng.choice(("Where is the {}?", "Find the {}.")).format(_absent(rng, shapes)), None)
    if kind == "caption":
        return shapes and q("Describe the image.", sorted(s.name for s in shapes))
    raise ValueError(kind)


def questions(n: int, seed: int = 0) -> list[Question]:
    """n questions of every type, one picture per question."""
    out: list[Question] = []
    for kind in TYPES:
        rng, got = random.Random(f"drawn:{seed}:{kind}"), 0
        while got < n:
            image, shapes = draw_picture(rng, _names(rng))
            question = ask(rng, kind, image, shapes) if shapes else None
            if question is not None:
                out.append(question)
                got += 1
    return out


_BOX = re.compile(r"\[\[(\d{3}),(\d{3}),(\d{3}),(\d{3})")
_WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b")
_NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven"))}


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def correct(question: Question, answer: str) -> bool:
    """Whether the answer is right: the word or number, a box with IoU >= 0.5 (boxes are in 000-999 of
    the image), no box and a negative word for an absent shape, every shape named once in a caption."""
    text = answer.strip().lower()
    words = text.translate(str.maketrans("", "", string.punctuation)).split()
    if question.type == "count":
        first = words[0] if words else ""
        return _NUMBERS.get(first, int(first) if first.isdigit() else -1) == question.expect
    if question.type == "ground":
        found = _BOX.search(text)
        if not found:
            return False
        w, h = question.image.size
        x0, y0, x1, y1 = (int(v) / 1000 for v in found.groups())
        return _iou((x0 * w, y0 * h, x1 * w, y1 * h), question.expect) >= 0.5
    if question.type == "absent":
        return not _BOX.search(text) and bool({"no", "none", "not", "nothing"} & set(words))
    if question.type == "caption":
        return sorted(f"{c} {k}" for c, k in _WORDS.findall(text)) == question.expect
    return bool(words) and words[0] == question.expect


def score(vlm, qs: list[Question], batch_size: int = 32) -> dict[str, float]:
    """Accuracy per type of the pipeline's answers (greedy, short answers, boxes and captions long enough)."""
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(qs), batch_size):
        chunk = qs[start : start + batch_size]
        answers = vlm.batch(
            [{"image": q.image, "query": q.query, "template_version": TEMPLATE[q.type]} for q in chunk],
            max_new_tokens=64,
            do_sample=False,
        )
        for q, a in zip(chunk, answers):
            hits.setdefault(q.type, []).append(correct(q, a))
    return {t: sum(v) / len(v) for t, v in hits.items()}


if __name__ == "__main__":
    import argparse

    import cogvlm

    parser = argparse.ArgumentParser(description="the default model (or --model) on PIL-drawn pictures")
    parser.add_argument("--n", type=int, default=300, help="questions per type")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokenizer", default=None, help="for a training checkpoint, which holds none")
    args = parser.parse_args()
    result = score(cogvlm.load(args.model, tokenizer=args.tokenizer, device="cpu"), questions(args.n, args.seed))
    for kind, acc in result.items():
        print(f"{kind:10s} {acc:.3f}")
