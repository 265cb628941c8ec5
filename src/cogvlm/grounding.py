"""Grounding boxes in CogVLM's text notation: parse, format, convert and draw.

The grounding model writes boxes inline as ``[[x0,y0,x1,y1]]``: each value is the
relative coordinate times 1000 as a 3-digit zero-padded integer (000-999), origin
top-left, x right, y down. Several boxes for one phrase share one pair of double
brackets, separated by ``;``: ``[[x0,y0,x1,y1;x0,y0,x1,y1]]``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# One bracket group. ``[`` is excluded from the body (the official pattern only
# excludes ``]``) so that an unclosed ``[[1,2,3,4`` cannot swallow a later group.
_GROUP_RE = re.compile(r"\[\[([^\[\]]+)\]\]")
_VALUE_RE = re.compile(r"[0-9]+")
_UNCLOSED_RE = re.compile(r"\[\[[0-9\s,;]*")  # leftover of an unclosed group, e.g. "[[1,2,3,4"
_CLAUSE_END = ".,;:!?"
_STRIP_CHARS = string.whitespace + string.punctuation
_SCALE = 1000  # coordinates are written as relative value * 1000

NormBox = tuple[float, float, float, float]  # xyxy, relative to image size, in [0, 1]
PixelBox = tuple[int, int, int, int]  # xyxy in pixels

# Clearly distinct colours, assigned to labels in order of first appearance.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (255, 225, 25),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
)


@dataclass(frozen=True)
class Box:
    """One grounded box: the phrase it belongs to and its normalised xyxy corners."""

    label: str
    box: NormBox  # (x0, y0, x1, y1), each value/1000, so in [0, 1] for valid output

    def to_pixels(self, width: int, height: int) -> PixelBox:
        """Pixel xyxy for an image of ``width`` x ``height``, truncated like the official demo."""
        x0, y0, x1, y1 = self.box
        return int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)

    def to_dict(self, width: int | None = None, height: int | None = None) -> dict:
        """JSON-ready dict with ``label`` and ``box``; adds ``pixels`` when a size is given."""
        out: dict = {"label": self.label, "box": list(self.box)}
        if width is not None and height is not None:
            out["pixels"] = list(self.to_pixels(width, height))
        return out


def _clean_label(segment: str) -> str:
    """Phrase a box belongs to: the last clause of the text preceding its group."""
    segment = _UNCLOSED_RE.split(segment)[-1].strip(_STRIP_CHARS)
    cut = max(segment.rfind(c) for c in _CLAUSE_END)
    return segment[cut + 1 :].strip(_STRIP_CHARS)


def _parse_group(body: str) -> list[NormBox]:
    """Boxes of one group body ``"x0,y0,x1,y1;..."``; malformed boxes are dropped."""
    boxes = []
    for part in body.split(";"):
        values = [v.strip() for v in part.split(",")]
        if len(values) == 4 and all(_VALUE_RE.fullmatch(v) for v in values):
            boxes.append(tuple(int(v) / _SCALE for v in values))
    return boxes


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed box in ``text``, labelled with the phrase written before its group."""
    result: list[Box] = []
    prev_end = 0
    for match in _GROUP_RE.finditer(text):
        label = _clean_label(text[prev_end : match.start()])
        result.extend(Box(label, box) for box in _parse_group(match.group(1)))
        prev_end = match.end()
    return result


def strip_boxes(text: str) -> str:
    """``text`` without any ``[[...]]`` group, for display or caption metrics."""
    text = _GROUP_RE.sub("", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", text)  # "star [[..]]." -> "star."
    return text.strip()


def _format_values(box: NormBox) -> str:
    """``"x0,y0,x1,y1"`` with each value round(v*1000) clamped to 0..999, 3 digits."""
    return ",".join(f"{min(max(round(v * _SCALE), 0), _SCALE - 1):03d}" for v in box)


def format_box(box: NormBox) -> str:
    """Official notation for one normalised box, e.g. ``[[120,340,310,560]]``."""
    return format_boxes([box])


def format_boxes(boxes: list[NormBox]) -> str:
    """Official notation for several boxes of one phrase in a single ``;``-joined group."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    return "[[" + ";".join(_format_values(b) for b in boxes) + "]]"


def pixel_to_normalised(box_px: tuple[float, float, float, float], width: int, height: int) -> NormBox:
    """Pixel xyxy -> normalised xyxy (x / width, y / height)."""
    x0, y0, x1, y1 = box_px
    return x0 / width, y0 / height, x1 / width, y1 / height


def boxes_to_json(boxes: list[Box], width: int, height: int) -> list[dict]:
    """JSON-ready dicts (label, normalised box, pixel box) for an image of the given size."""
    return [b.to_dict(width, height) for b in boxes]


def draw_boxes(image: Image.Image, boxes: list[Box]) -> Image.Image:
    """New RGB copy of ``image`` with each box outlined and labelled, one colour per label."""
    out = image.convert("RGB")  # always a new image, even when already RGB
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width, height = out.size
    line = max(2, round(min(width, height) / 200))
    colours: dict[str, tuple[int, int, int]] = {}
    for b in boxes:
        colour = colours.setdefault(b.label, _PALETTE[len(colours) % len(_PALETTE)])
        px0, py0, px1, py1 = b.to_pixels(width, height)
        x0, x1 = sorted((min(max(px0, 0), width - 1), min(max(px1, 0), width - 1)))
        y0, y1 = sorted((min(max(py0, 0), height - 1), min(max(py1, 0), height - 1)))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if not b.label:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
        tw, th = right - left + 4, bottom - top + 4  # 2 px padding each side
        tx = max(0, min(x0, width - tw))
        ty = y0 - th if y0 - th >= 0 else y0 + line  # inside the box when at the top edge
        draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        text_colour = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.text((tx + 2 - left, ty + 2 - top), b.label, fill=text_colour, font=font)
    return out
