"""Grounding metrics: Acc@IoU>=0.5 of the first generated box, and Visual7W pointing.

Boxes in answers are CogVLM's `[[x0,y0,x1,y1]]` (values / 1000, see `cogvlm.grounding`); they are
scaled by the original image width and height and compared on continuous pixel coordinates (no
+1 convention). Ground truth in COCO's [x, y, w, h] is converted to corners first. An answer
without a box is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...grounding import parse_boxes

Corners = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

IOU_THRESHOLD = 0.5


def xywh_to_xyxy(box: Sequence[float]) -> Corners:
    """COCO [x, y, width, height] -> [x0, y0, x1, y1]."""
    x, y, w, h = (float(v) for v in box)
    return x, y, x + w, y + h


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two corner boxes; 0 when either is empty or inverted."""

    def area(box: Sequence[float]) -> float:
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def to_pixels(box: Sequence[float], width: float, height: float) -> Corners:
    """Normalised corners (value / 1000, as parsed) -> pixel corners, without rounding."""
    x0, y0, x1, y1 = box
    return x0 * width, y0 * height, x1 * width, y1 * height


def first_box(text: str, width: float, height: float) -> Corners | None:
    """The first box written in `text`, in pixels of a `width` x `height` image, or None."""
    boxes = parse_boxes(text)
    return to_pixels(boxes[0].box, width, height) if boxes else None


def grounding_hit(
    text: str, target: Sequence[float], width: float, height: float, threshold: float = IOU_THRESHOLD
) -> float:
    """1.0 when the answer's first box has IoU >= `threshold` with `target` (pixel corners)."""
    box = first_box(text, width, height)
    return float(box is not None and box_iou(box, target) >= threshold)


def pointing_choice(text: str, candidates: Sequence[Sequence[float]], width: float, height: float) -> int | None:
    """Index of the candidate box (pixel corners) that overlaps the answer's first box most;
    None when the answer has no box or it overlaps none (the first candidate wins ties)."""
    box = first_box(text, width, height)
    if box is None:
        return None
    overlaps = [box_iou(box, c) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (overlaps[i], -i))
    return best if overlaps[best] > 0 else None
