"""The shipped default model: it looks at the image, and answers about scenes it never saw.

The floors are regression guards at the levels the shipped model reaches on these fixed,
held-out questions (seed 999_999, never used in training), not the project's targets, which
it does not reach yet; the model card has the full evaluation (500 questions per type).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import cogvlm
from cogvlm.eval.tasks.shapes import evaluate_shapes
from cogvlm.pipeline import DEFAULT_MODEL

#: Per-type accuracy floors on 12 held-out questions per type (108 in all); the shipped model
#: gets colour 0.67 and count 0.58 here. Types it answers at chance have no floor yet.
FLOORS = {"color": 0.6, "count": 0.5}


@pytest.fixture(scope="module")
def vlm():
    assert (DEFAULT_MODEL / "config.json").is_file(), "the default model is missing from the package"
    return cogvlm.load(device="cpu")


@pytest.fixture(scope="module")
def heldout(vlm):
    return evaluate_shapes(vlm, n=12, batch_size=12)


def test_heldout_accuracy_per_type(heldout):
    per_type = heldout["per_type"]
    low = {t: round(per_type[t], 3) for t, floor in FLOORS.items() if per_type[t] < floor}
    assert not low, f"below the floor: {low} (all: {per_type})"


def test_shuffled_images_fall_to_chance(vlm, heldout):
    shuffled = evaluate_shapes(vlm, n=12, batch_size=12, shuffle=True)["per_type"]
    for task in ("color", "shape"):  # 10 colours, 5 kinds: chance is 0.1 and 0.2
        assert shuffled[task] <= 0.4, (task, shuffled[task])
    # The colour answer comes from the image: with another scene's image it is lost.
    assert heldout["per_type"]["color"] - shuffled["color"] >= 0.4, (heldout["per_type"], shuffled)


PLAIN_COLORS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0),
                "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (139, 69, 19)}


def _drawn_scenes() -> list[tuple[Image.Image, str, str]]:
    """One shape of a named colour on a plain background, drawn with plain PIL calls."""
    scenes = []
    for i, (name, rgb) in enumerate(PLAIN_COLORS.items()):
        for j, (kind, size, (cx, cy), side) in enumerate([("circle", 60, (70, 80), 200),
                                                          ("square", 90, (150, 140), 240),
                                                          ("circle", 45, (120, 60), 160)]):
            image = Image.new("RGB", (side, side), (255, 255, 255) if (i + j) % 2 else (235, 235, 225))
            draw = ImageDraw.Draw(image)
            box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=rgb)
            scenes.append((image, name, kind))
    return scenes


def test_colour_of_shapes_drawn_outside_the_generator(vlm, capsys):
    scenes = _drawn_scenes()
    colours = vlm.batch([{"image": img, "query": f"What color is the {kind}?"} for img, _, kind in scenes],
                        max_new_tokens=4)
    kinds = vlm.batch([{"image": img, "query": f"What shape is the {name} object?"} for img, name, _ in scenes],
                      max_new_tokens=4)
    colour_acc = sum(a.strip().lower() == name for a, (_, name, _) in zip(colours, scenes)) / len(scenes)
    shape_acc = sum(a.strip().lower() == kind for a, (_, _, kind) in zip(kinds, scenes)) / len(scenes)
    with capsys.disabled():
        print(f"\nPIL-drawn scenes: colour {colour_acc:.2f}, shape {shape_acc:.2f} ({len(scenes)} scenes)")
    assert colour_acc >= 0.7


def test_readme_first_command():
    scene = Path(__file__).resolve().parents[1] / "examples" / "scene.png"
    proc = subprocess.run([sys.executable, "-m", "cogvlm.cli", "ask", str(scene),
                           "--query", "What color is the star?"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from cogvlm.synthetic import COLORS

    assert proc.stdout.strip().split(": ")[-1] in COLORS  # a colour name (the star is red)
