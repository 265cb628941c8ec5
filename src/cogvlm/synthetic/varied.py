"""Varied scenes: the pictures people draw with PIL, not only the plain scenes of `make_scene`.

Any canvas size and aspect (the model's preprocessing squashes it to a square, so elongated kinds
are drawn clearly elongated: a rectangle or ellipse is at least 1.9 times as long as it is wide,
and canvases stay within 0.7-1.45 wide per high), any background (light, dark, saturated,
gradients, light noise), each name's colour from several common renderings (PIL's named colours
among them), filled or outlined shapes, with and without anti-aliasing, sizes from 5% to 75% of
the shorter side, repeated kinds and colours, and sometimes a JPEG round trip. Every shape stands
out from the background by at least `MIN_CONTRAST`.
"""

from __future__ import annotations

import math
import random

from .scene import COLORS, KINDS, Look, Scene, Shape, overlaps

MAX_SHAPES = 6
MIN_CONTRAST = 100.0  # Euclidean RGB distance between a shape's colour and every background colour
COLOR_JITTER = 20  # per channel, on top of a rendering
ELONGATION = (1.9, 3.2)  # long side / short side of rectangles and ellipses
ASPECTS = (0.7, 1.45)  # canvas width / height when not square
#: Several renderings of each colour name: the plain palette's, PIL's named colour, and common variants.
RENDERINGS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": (COLORS["red"], (255, 0, 0), (200, 0, 0), (230, 50, 50), (180, 20, 30)),
    "green": (COLORS["green"], (0, 128, 0), (0, 200, 0), (34, 139, 34), (60, 180, 75), (0, 255, 0)),
    "blue": (COLORS["blue"], (0, 0, 255), (0, 0, 200), (65, 105, 225), (30, 144, 255), (0, 60, 160)),
    "yellow": (COLORS["yellow"], (255, 255, 0), (255, 215, 0), (230, 230, 40), (250, 220, 80)),
    "black": (COLORS["black"], (0, 0, 0), (35, 35, 35)),
    "gray": (COLORS["gray"], (128, 128, 128), (160, 160, 160), (100, 100, 100), (169, 169, 169)),
    "teal": (COLORS["teal"], (0, 128, 128), (0, 150, 140), (32, 160, 160)),
    "brown": (COLORS["brown"], (165, 42, 42), (139, 69, 19), (150, 90, 40), (110, 60, 20)),
    "purple": (COLORS["purple"], (128, 0, 128), (160, 32, 240), (120, 60, 180), (150, 50, 150)),
    "orange": (COLORS["orange"], (255, 165, 0), (255, 140, 0), (240, 120, 30), (255, 120, 0)),
}
#: Largest extent (fraction of the shorter side) by number of shapes, so that they fit side by side.
_MAX_EXTENT = {1: 0.75, 2: 0.45, 3: 0.38, 4: 0.32, 5: 0.28, 6: 0.25}
_MIN_EXTENT = 0.05


def _background(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
    """A plain light, dark or saturated colour, or a gradient between two random colours."""
    r = rng.random()
    if r < 0.3:  # white or near it
        level = rng.randint(225, 255)
        return tuple(min(255, level + rng.randint(-12, 0)) for _ in range(3)), None  # type: ignore[return-value]
    if r < 0.5:  # dark
        level = rng.randint(0, 75)
        return tuple(max(0, level + rng.randint(-10, 10)) for _ in range(3)), None  # type: ignore[return-value]
    if r < 0.75:  # any colour
        return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)), None
    start = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    end = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
    return start, end


def _rgb(rng: random.Random, name: str) -> tuple[int, int, int]:
    base = rng.choice(RENDERINGS[name])
    return tuple(min(255, max(0, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in base)  # type: ignore[return-value]


def _names(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(colour, kind) of n shapes: all different, drawn independently, or one name repeated."""
    pairs = [(c, k) for c in COLORS for k in KINDS]
    r = rng.random()
    if r < 0.5:
        return rng.sample(pairs, n)
    if r < 0.8:
        return [rng.choice(pairs) for _ in range(n)]
    repeated = rng.choice(pairs)
    copies = rng.randint(min(2, n), n)
    return [repeated] * copies + [rng.choice(pairs) for _ in range(n - copies)]


def _dims(kind: str, extent: float, rng: random.Random) -> tuple[int, int]:
    """(width, height) in pixels of a shape whose longer side is `extent` pixels."""
    long = max(4, round(extent))
    if kind in ("rectangle", "ellipse"):
        short = max(3, round(long / rng.uniform(*ELONGATION)))
        return (long, short) if rng.random() < 0.5 else (short, long)
    if kind == "triangle":
        return long, max(4, round(long * rng.uniform(0.75, 1.0)))
    if kind == "star":
        return long, max(4, round(long * 0.95))
    return long, long


def _size_name(extent: float, side: int) -> str:
    """The caption's size word, on the plain scenes' scale (small 0.14, medium 0.22, large 0.32)."""
    fraction = extent / side
    return "small" if fraction < 0.17 else "large" if fraction > 0.28 else "medium"


def _area_matched_dims(rng: random.Random, smallest: float, largest: float, room: float) -> tuple[int, int]:
    """(width, height) of a rectangle or ellipse as large in area as a square or circle whose side is
    drawn from smallest-largest as theirs is, its longer side within `room` (the canvas's shorter
    side less its borders); so that a shape's size says little of its kind (with `_dims`, a
    rectilinear shape as large in area as a square a fifth of the canvas's shorter side or more
    is a square 81-89% of the time)."""
    stretch = math.sqrt(rng.uniform(*ELONGATION))
    top = max(smallest, min(largest, room / stretch))
    equal_side = math.exp(rng.uniform(math.log(smallest), math.log(top)))
    long, short = max(4, round(equal_side * stretch)), max(3, round(equal_side / stretch))
    return (long, short) if rng.random() < 0.5 else (short, long)


def canvas(rng: random.Random, max_aspect: float | None = None) -> tuple[int, int]:
    """(width, height): a square or an aspect within ASPECTS (within 1/max_aspect-max_aspect when
    given), the longer side 112-512 pixels."""
    longer = round(math.exp(rng.uniform(math.log(112), math.log(512))))
    aspects = ASPECTS if max_aspect is None else (1 / max_aspect, max_aspect)
    aspect = 1.0 if rng.random() < 0.4 else rng.uniform(*aspects)
    if aspect >= 1:
        return longer, max(64, round(longer / aspect))
    return max(64, round(longer * aspect)), longer


def make_varied_scene(
    rng: random.Random,
    *,
    min_shapes: int = 1,
    max_shapes: int = MAX_SHAPES,
    max_aspect: float | None = None,
    match_area: bool = False,
) -> Scene:
    """A random varied scene of min_shapes-max_shapes non-overlapping shapes (fewer when some do not fit).

    `max_aspect` narrows the canvases (see `canvas`): within 4:3 a rectangle (1.9-3.2 long) still
    looks longer than a square on any canvas once the preprocessing squashes it to a square.
    `match_area` sizes rectangles and ellipses by area as squares and circles are (see
    `_area_matched_dims`) instead of by their longer side.
    """
    width, height = canvas(rng, max_aspect)
    side = min(width, height)
    background, gradient = _background(rng)
    look = Look(
        background=background,
        gradient=gradient,
        gradient_angle=rng.choice((0.0, 90.0, 45.0, 135.0, rng.uniform(0, 360))),
        noise=rng.uniform(2, 10) if rng.random() < 0.3 else 0.0,
        supersample=3 if rng.random() < 0.5 else 1,
        jpeg_quality=rng.randint(35, 90) if rng.random() < 0.3 else 0,
        seed=rng.randrange(2**31),
    )
    n = rng.randint(min_shapes, max_shapes)
    outlined = rng.random() < 0.3  # the whole drawing in outlines, else each shape by itself
    border, margin = max(2, side // 50), max(3, side // 40)
    shapes: list[Shape] = []
    for color, kind in _names(rng, n):
        rgb = _rgb(rng, color)
        if min(math.dist(rgb, b) for b in look.background_colors()) < MIN_CONTRAST:
            continue  # the background would hide it
        upper = _MAX_EXTENT[n]
        if match_area and kind in ("rectangle", "ellipse"):
            w, h = _area_matched_dims(rng, side * _MIN_EXTENT, side * upper, side - 2 * border)
        else:
            extent = side * math.exp(rng.uniform(math.log(_MIN_EXTENT), math.log(upper)))
            w, h = _dims(kind, extent, rng)
        if w > width - 2 * border or h > height - 2 * border:
            continue
        outline = 0
        if outlined or rng.random() < 0.1:
            outline = max(2, round(side * rng.uniform(0.01, 0.03)))
            outline = outline if 3 * outline < min(w, h) and min(w, h) >= 12 else 0  # too small for a hole: filled
        variant = rng.randrange(6) if kind == "triangle" else int(rng.random() < 0.2) if kind == "star" else 0
        for _ in range(60):
            x0 = rng.randint(border, width - border - w)
            y0 = rng.randint(border, height - border - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(not overlaps(box, s.box, margin) for s in shapes):
                center = (x0 + w / 2, y0 + h / 2)
                shapes.append(Shape(kind, color, _size_name(max(w, h), side), box, center, rgb, outline, variant))
                break
    return Scene(width, height, "varied", tuple(shapes), look.seed, look)
