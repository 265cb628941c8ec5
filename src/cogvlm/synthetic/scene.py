"""Shape scenes: what is drawn where, and how it is rendered.

A `Scene` is pure data (canvas, background, shapes with their tight pixel boxes); `render()` is a
pure function of it. `make_scene` draws the plain scenes the default model first learned on (a few
shapes on a light background, square canvas); `cogvlm.synthetic.varied` draws the scenes people
draw with PIL (any canvas, dark and gradient backgrounds, outlines, anti-aliasing, JPEG), whose
extra rendering settings live in a `Look`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .. import grounding

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
KINDS: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "star", "ellipse")
PLAIN_KINDS: tuple[str, ...] = KINDS[:5]  # the kinds of `make_scene` (ellipses came with varied scenes)
MAX_SHAPES = 4  # per scene
COLOR_JITTER = 16  # per channel, on top of the named colour (see Scene.shape_rgb)
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.22, "large": 0.32}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "beige": (245, 240, 225),
    "blue-gray": (228, 234, 242),
}
TEXTURES: tuple[str, ...] = ("plain", "noise", "stripes", "grid")
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
    rgb: tuple[int, int, int] | None = None  # varied scenes: the exact colour drawn
    outline: int = 0  # varied scenes: outline width in pixels, 0 = filled
    variant: int = 0  # varied scenes: triangle orientation (0-5) or star pointing up (0) / down (1)

    @property
    def name(self) -> str:
        """Unambiguous reference within a scene, e.g. ``"red circle"``."""
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Look:
    """How a varied scene is rendered beyond its shapes: background, noise, anti-aliasing, JPEG."""

    background: tuple[int, int, int]
    gradient: tuple[int, int, int] | None = None  # far end of a linear gradient from `background`
    gradient_angle: float = 0.0  # degrees: 0 runs left to right, 90 top to bottom
    noise: float = 0.0  # standard deviation of per-pixel noise, in levels
    supersample: int = 1  # > 1: shapes drawn that many times larger and averaged down (anti-aliased)
    jpeg_quality: int = 0  # > 0: the image goes through JPEG at this quality
    seed: int = 0  # of the noise

    def background_colors(self) -> list[tuple[int, int, int]]:
        """The colours the background runs between (a shape must stand out from all of them)."""
        return [self.background] if self.gradient is None else [self.background, self.gradient]

    def render(self, scene: Scene) -> Image.Image:
        """The scene's pixels: shapes composited by their coverage over the background."""
        w, h, ss = scene.width, scene.height, self.supersample
        color = Image.new("RGB", (w * ss, h * ss))  # shapes over black = colour x coverage
        cover = Image.new("L", (w * ss, h * ss))
        paint, mask = ImageDraw.Draw(color), ImageDraw.Draw(cover)
        for s in scene.shapes:
            box = (s.box[0] * ss, s.box[1] * ss, s.box[2] * ss, s.box[3] * ss)
            draw_shape(paint, s.kind, box, s.rgb, s.outline * ss, s.variant)
            draw_shape(mask, s.kind, box, 255, s.outline * ss, s.variant)
        if ss > 1:
            color, cover = color.resize((w, h), Image.BOX), cover.resize((w, h), Image.BOX)
        alpha = np.asarray(cover, dtype=np.float32)[..., None] / 255  # (h, w, 1)
        rgb = self._background(w, h) * (1 - alpha) + np.asarray(color, dtype=np.float32)
        if self.noise > 0:
            rgb += np.random.RandomState(self.seed).normal(0, self.noise, rgb.shape).astype(np.float32)
        img = Image.fromarray(np.clip(rgb.round(), 0, 255).astype(np.uint8), "RGB")
        if self.jpeg_quality > 0:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.jpeg_quality)
            img = Image.open(buf).convert("RGB")
        return img

    def _background(self, w: int, h: int) -> np.ndarray:
        """float32 (h, w, 3): the plain colour, or the gradient along `gradient_angle`."""
        start = np.array(self.background, dtype=np.float32)
        if self.gradient is None:
            return np.broadcast_to(start, (h, w, 3)).copy()
        angle = math.radians(self.gradient_angle)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)  # 0 .. 1 across the canvas
        return start + t[..., None] * (np.array(self.gradient, dtype=np.float32) - start)


@dataclass(frozen=True)
class Scene:
    """A rendered-on-demand scene; ``texture_seed`` makes noisy/striped backgrounds reproducible."""

    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]
    texture_seed: int = 0
    look: Look | None = None  # varied scenes only

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds this scene's generator draws from (questions about absent shapes use them)."""
        return PLAIN_KINDS if self.look is None else KINDS

    def render(self) -> Image.Image:
        """Draw the scene as an RGB image (pure function of the dataclass fields)."""
        if self.look is not None:
            return self.look.render(self)
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
            draw_shape(draw, shape.kind, shape.box, self.shape_rgb(i))
        return img

    def shape_rgb(self, i: int) -> tuple[int, int, int]:
        """Shape i's fill: its named colour moved by up to COLOR_JITTER per channel, so a model
        learns colour names rather than eight exact RGB values."""
        rs = np.random.RandomState((self.texture_seed + 7919 * (i + 1)) % 2**32)
        jitter = rs.randint(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        return tuple(int(v) for v in np.clip(np.array(COLORS[self.shapes[i].color]) + jitter, 0, 255))


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill, outline: int = 0, variant: int = 0
) -> None:
    """Draw ``kind`` so that its pixels exactly fill ``box`` (exclusive x1/y1); ``outline`` > 0 draws
    only a border that wide, ``variant`` turns triangles and stars (see `Shape`)."""
    x0, y0, x1, y1 = box
    r, b = x1 - 1, y1 - 1  # last pixel column / row
    w, h = r - x0, b - y0
    paint = {"fill": fill} if outline <= 0 else {"outline": fill, "width": outline}
    if kind in ("circle", "ellipse"):
        draw.ellipse((x0, y0, r, b), **paint)
    elif kind in ("square", "rectangle"):
        draw.rectangle((x0, y0, r, b), **paint)
    elif kind == "triangle":
        cx, cy = x0 + w / 2, y0 + h / 2
        corners = (
            [(x0, b), (r, b), (cx, y0)],  # pointing up
            [(x0, y0), (r, y0), (cx, b)],  # down
            [(r, y0), (r, b), (x0, cy)],  # left
            [(x0, y0), (x0, b), (r, cy)],  # right
            [(x0, y0), (x0, b), (r, b)],  # right angle at the bottom left
            [(r, y0), (r, b), (x0, b)],  # right angle at the bottom right
        )[variant]
        draw.polygon(corners, **paint)
    elif kind == "star":
        pts = [
            (
                x0 + (px - _STAR_X[0]) / (_STAR_X[1] - _STAR_X[0]) * w,
                y0 + (py - _STAR_Y[0]) / (_STAR_Y[1] - _STAR_Y[0]) * h,
            )
            for px, py in _STAR
        ]
        if variant == 1:  # pointing down: mirror top to bottom
            pts = [(px, y0 + b - py) for px, py in pts]
        draw.polygon(pts, **paint)
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


def overlaps(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    """Whether pixel boxes a and b come closer than `margin`."""
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
    pairs = rng.sample([(c, k) for c in COLORS for k in PLAIN_KINDS], n)
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
            if all(not overlaps(box, s.box, margin) for s in shapes):
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
        "shapes": [_shape_dict(s, scene.look is not None) for s in scene.shapes],
        **({"look": dataclasses.asdict(scene.look)} if scene.look is not None else {}),
    }


def _shape_dict(s: Shape, varied: bool) -> dict:
    plain = {"kind": s.kind, "color": s.color, "size": s.size, "box": list(s.box), "center": list(s.center)}
    return {**plain, "rgb": list(s.rgb or ()), "outline": s.outline, "variant": s.variant} if varied else plain


def scene_from_dict(d: dict) -> Scene:
    """Inverse of `scene_to_dict`."""
    shapes = tuple(
        Shape(
            s["kind"],
            s["color"],
            s["size"],
            tuple(s["box"]),
            tuple(s["center"]),
            tuple(s["rgb"]) if s.get("rgb") else None,
            s.get("outline", 0),
            s.get("variant", 0),
        )
        for s in d["shapes"]
    )
    look = None
    if "look" in d:
        fields = dict(d["look"])
        fields["background"] = tuple(fields["background"])
        fields["gradient"] = tuple(fields["gradient"]) if fields.get("gradient") else None
        look = Look(**fields)
    return Scene(d["width"], d["height"], d["background"], shapes, d.get("texture_seed", 0), look)


def format_box(box_px: Sequence[float], width: int, height: int) -> str:
    """Official grounding notation of a pixel box: ``[[x0,y0,x1,y1]]`` in 000-999."""
    return grounding.format_box(grounding.pixel_to_normalised(tuple(box_px), width, height))
