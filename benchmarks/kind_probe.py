"""Which shapes does a model misname, and at what size? The kind answers of a model on single shapes.

    python benchmarks/kind_probe.py [--model DIR [--tokenizer DIR]] [--scenes 400] [--seed 777]

Two sets, each asked "What is the <colour> shape?" with the vqa template and scored on the answer's
first word: (1) one filled shape alone on a white 224 x 224 canvas, drawn with plain PIL calls, for
the four kinds a square canvas can confuse (rectangles and ellipses 2-3 times as long as wide) at
five sizes (the longer side 15-75% of the canvas); (2) the generator's own varied scenes of one or
two shapes (`cogvlm.synthetic.varied`, any canvas, background and outline), by kind and by size
band of the asked shape. Printed: accuracy per kind, per size, each kind by size, and the
commonest confusions.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections import Counter, defaultdict

from PIL import Image, ImageDraw

import cogvlm
from cogvlm.synthetic import KINDS
from cogvlm.synthetic.varied import make_varied_scene

FILLS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 40), "orange": (255, 140, 0)}
PLAIN_KINDS = ("rectangle", "ellipse", "square", "circle")
FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75)


def plain_shapes(rng: random.Random) -> list[tuple[Image.Image, str, str, str]]:
    """(image, colour, kind, size label) for each kind x size x colour x 2 placements."""
    items = []
    for kind, fraction, colour, _ in itertools.product(PLAIN_KINDS, FRACTIONS, FILLS, range(2)):
        long = round(224 * fraction)
        short = round(long / rng.uniform(2.0, 3.0)) if kind in ("rectangle", "ellipse") else long
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        image = Image.new("RGB", (224, 224), "white")
        x0, y0 = rng.randint(4, 220 - w), rng.randint(4, 220 - h)
        draw = ImageDraw.Draw(image)
        paint = draw.ellipse if kind in ("ellipse", "circle") else draw.rectangle
        paint((x0, y0, x0 + w, y0 + h), fill=FILLS[colour])
        items.append((image, colour, kind, f"{fraction:.2f}"))
    return items


def generator_shapes(seed: int, n: int) -> list[tuple[Image.Image, str, str, str]]:
    """(image, colour, kind, size band) of the first shape of varied 1-2-shape scenes whose colour is unique."""
    items = []
    for i in range(n):
        scene = make_varied_scene(random.Random(f"{seed}:{i}"), max_shapes=2, max_aspect=1.333)
        if not scene.shapes or [s.color for s in scene.shapes].count(scene.shapes[0].color) > 1:
            continue
        shape = scene.shapes[0]
        extent = max(shape.box[2] - shape.box[0], shape.box[3] - shape.box[1]) / min(scene.width, scene.height)
        band = "small (<15%)" if extent < 0.15 else "mid (15-35%)" if extent < 0.35 else "big (>35%)"
        items.append((scene.render(), shape.color, shape.kind, band))
    return items


def report(title: str, items: list[tuple[Image.Image, str, str, str]], answers: list[str]) -> None:
    """Accuracy per kind and per size, and the five commonest (truth, answer) confusions."""
    hits: dict[str, list[bool]] = defaultdict(list)
    confusions: Counter = Counter()
    for (_, _, kind, size), answer in zip(items, answers):
        word = answer.split()[0].strip(".,") if answer.split() else ""
        for key in ("all", kind, size, f"{kind} {size}"):
            hits[key].append(word == kind)
        if word != kind:
            confusions[(kind, word)] += 1
    print(f"{title}: {len(items)} questions")
    kinds = sorted(k for k in hits if k in KINDS)
    sizes = sorted(k for k in hits if k not in KINDS and k != "all" and k.split()[0] not in KINDS)
    for key in ["all", *kinds, *sizes]:
        print(f"  {key:<14} {sum(hits[key]) / len(hits[key]):.2f} ({len(hits[key])})")
    for kind in kinds:  # each kind by size: right / asked
        cells = (f"{size} {sum(hits[f'{kind} {size}'])}/{len(hits[f'{kind} {size}'])}" for size in sizes)
        print(f"  {kind:<14} by size: " + ", ".join(c for c in cells if not c.endswith("/0")))
    common = ", ".join(f"{truth} -> {answer} {n}" for (truth, answer), n in confusions.most_common(5))
    print("  commonest confusions (truth -> answer):", common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--scenes", type=int, default=400, help="varied scenes drawn for set 2")
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    vlm = cogvlm.load(args.model, tokenizer=args.tokenizer, device="cpu")
    for title, items in (
        ("one filled shape on white (plain PIL)", plain_shapes(random.Random(args.seed))),
        ("the generator's varied scenes, 1-2 shapes", generator_shapes(args.seed, args.scenes)),
    ):
        requests = [{"image": im, "query": f"What is the {c} shape?", "template_version": "vqa"} for im, c, *_ in items]
        report(title, items, vlm.batch(requests, max_new_tokens=10, do_sample=False))


if __name__ == "__main__":
    main()
