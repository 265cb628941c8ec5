"""The shipped default model: it looks at the image, and answers about scenes it never saw.

On fixed held-out questions (seed 999_999, never used in training; 300 per type) every type with a
target must meet it within a binomial margin: two standard errors of an accuracy at the target on
300 questions (colour 0.95 +- 0.025, count 0.93 +- 0.029, shape 0.85 +- 0.041, existence and
position 0.90 +- 0.035, captions 0.60 +- 0.057, boxes 0.65 +- 0.055). A model whose true accuracy is
the target falls below that about 2% of the time on a fresh draw; the questions here are fixed, so
the test itself is deterministic. Relations and grounded captions have no target: they are held to
regression floors, what the shipped model scores less the same margin.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import cogvlm
from cogvlm.eval import evaluate_shapes
from cogvlm.pipeline import DEFAULT_MODEL

N_HELDOUT = 300
#: The project's targets (docs: the model card's held-out table).
TARGETS = {"color": 0.95, "count": 0.93, "shape": 0.85, "exist": 0.9, "position": 0.9, "caption": 0.6, "ground": 0.65}
#: No target: what the shipped model scores on these 300 questions.
FLOORS = {"relation": 0.853, "ground_caption": 0.519}


def margin(p: float, n: int = N_HELDOUT) -> float:
    """Two standard errors of an accuracy p measured on n questions."""
    return 2 * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def vlm():
    assert (DEFAULT_MODEL / "config.json").is_file(), "the default model is missing from the package"
    return cogvlm.load(device="cpu")


@pytest.fixture(scope="module")
def heldout(vlm):
    return evaluate_shapes(vlm, n=N_HELDOUT, batch_size=32)


def test_heldout_accuracy_per_type(heldout):
    per_type = heldout["per_type"]
    bars = {t: p - margin(p) for t, p in {**TARGETS, **FLOORS}.items()}
    low = {t: (round(per_type[t], 3), round(bar, 3)) for t, bar in bars.items() if per_type[t] < bar}
    assert not low, f"below the target less its margin (score, bar): {low} (all: {per_type})"


def test_shuffled_images_fall_to_chance(vlm, heldout):
    shuffled = evaluate_shapes(vlm, n=100, batch_size=32, shuffle=True, types=("color", "shape"))["per_type"]
    for task in ("color", "shape"):  # 10 colours, 5 kinds: chance is 0.1 and 0.2
        assert shuffled[task] <= 0.4, (task, shuffled[task])
    # The colour and shape answers come from the image: with another scene's image they are lost.
    for task in ("color", "shape"):
        assert heldout["per_type"][task] - shuffled[task] >= 0.4, (task, heldout["per_type"], shuffled)


PLAIN_COLORS = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (139, 69, 19),
}
PLAIN_KINDS = ("circle", "square", "rectangle", "triangle", "star")
#: Floors on the 40 PIL-drawn scenes, just under what the shipped model reaches (see the model card).
PLAIN_FLOORS = {"color": 0.9, "shape": 0.75}


def _outline(kind: str, cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    """Corner points of a shape of half-size r around (cx, cy), from first principles."""
    if kind in ("square", "rectangle"):
        w = r if kind == "square" else round(r * 1.6)
        h = r if kind == "square" else round(r * 0.8)
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "star":
        return [
            (
                cx + (r if i % 2 == 0 else 0.4 * r) * math.cos(math.radians(-90 + 36 * i)),
                cy + (r if i % 2 == 0 else 0.4 * r) * math.sin(math.radians(-90 + 36 * i)),
            )
            for i in range(10)
        ]
    raise ValueError(kind)


def _drawn_scenes() -> list[tuple[Image.Image, str, str]]:
    """One shape of a named colour on a plain background, drawn with plain PIL calls: 8 colours x
    5 kinds, a sixth to a third of the image across, at random positions (seeded)."""
    rng, scenes = random.Random(2026), []
    for name, rgb in PLAIN_COLORS.items():
        for kind in PLAIN_KINDS:
            side = rng.choice((160, 200, 240))
            r = round(side * rng.uniform(0.08, 0.18))
            cx, cy = (rng.randint(round(1.7 * r), side - round(1.7 * r)) for _ in "xy")
            background = rng.choice(((255, 255, 255), (235, 235, 225), (225, 235, 245)))
            image = Image.new("RGB", (side, side), background)
            draw = ImageDraw.Draw(image)
            if kind == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
            else:
                draw.polygon(_outline(kind, cx, cy, r), fill=rgb)
            scenes.append((image, name, kind))
    return scenes


def test_colour_and_shape_of_shapes_drawn_outside_the_generator(vlm, capsys):
    scenes = _drawn_scenes()
    colours = vlm.batch(
        [{"image": img, "query": f"What color is the {kind}?"} for img, _, kind in scenes], max_new_tokens=4
    )
    kinds = vlm.batch(
        [{"image": img, "query": f"What shape is the {name} object?"} for img, name, _ in scenes], max_new_tokens=4
    )
    colour_acc = sum(a.strip().lower() == name for a, (_, name, _) in zip(colours, scenes)) / len(scenes)
    shape_acc = sum(a.strip().lower() == kind for a, (_, _, kind) in zip(kinds, scenes)) / len(scenes)
    with capsys.disabled():
        print(f"\nPIL-drawn scenes: colour {colour_acc:.2f}, shape {shape_acc:.2f} ({len(scenes)} scenes)")
    assert colour_acc >= PLAIN_FLOORS["color"] and shape_acc >= PLAIN_FLOORS["shape"], (colour_acc, shape_acc)


def test_readme_first_command():
    scene = Path(__file__).resolve().parents[1] / "examples" / "scene.png"
    proc = subprocess.run(
        [sys.executable, "-m", "cogvlm.cli", "ask", str(scene), "--query", "What color is the star?"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(": ")[-1] == "red"  # the star in examples/scene.png is red
