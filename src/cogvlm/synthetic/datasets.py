"""Whole datasets of scenes and records: in memory for training and evaluation, or written to disk.

Scene ``i`` of seed ``s`` always comes from ``random.Random(f"{s}:{i}")``, so the same arguments give
the same scenes, records and (written) bytes.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from ..fileio import atomic_write_bytes
from .records import TASKS, make_records
from .scene import MAX_SHAPES, Scene, make_scene, scene_to_dict
from .varied import MAX_SHAPES as VARIED_MAX_SHAPES
from .varied import make_varied_scene


def draw_scene(
    rng: random.Random,
    size: int = 224,
    *,
    varied: bool = False,
    easy: bool = False,
    min_shapes: int = 1,
    max_shapes: int | None = None,
    max_aspect: float | None = None,
    match_area: bool = False,
) -> Scene:
    """A plain scene (`make_scene`, size x size) or a varied one (`make_varied_scene`, its own canvas);
    `max_shapes` defaults to the generator's most."""
    if varied:
        most = max_shapes or VARIED_MAX_SHAPES
        return make_varied_scene(
            rng, min_shapes=min_shapes, max_shapes=most, max_aspect=max_aspect, match_area=match_area
        )
    return make_scene(rng, size, min_shapes=min_shapes, max_shapes=max_shapes or MAX_SHAPES, easy=easy)


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
    varied: bool = False,
) -> Iterator[tuple[str, Scene, list[dict]]]:
    """Yield (image path, scene, records) for scenes 0..n-1; scene i depends only on (seed, i)."""
    for i in range(n):
        rng = _scene_rng(seed, i)
        scene = draw_scene(rng, size, varied=varied, easy=easy)
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
    varied: bool = False,
) -> Iterator[tuple[Image.Image, dict]]:
    """In-memory (image, record) pairs for on-the-fly training and evaluation.

    Records of one scene share one PIL image object; copy it before mutating.
    """
    for _, scene, records in iter_scenes(seed, n, size, tasks, easy, per_scene, turns, varied):
        image = scene.render()
        for record in records:
            yield image, record


def corpus(seed: int, n: int) -> Iterator[str]:
    """Every prompt (as its template writes it) and answer of n scenes: text to train a tokenizer."""
    from ..prompts import format_prompt

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
    varied: bool = False,
) -> Path:
    """Write ``images/NNNNNN.png``, ``data.jsonl`` (records) and ``scenes.jsonl`` (ground truth).

    Every file is written atomically; the same arguments give byte-identical output.
    Returns the path of data.jsonl.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    data_lines, scene_lines = [], []
    for path, scene, records in iter_scenes(seed, n, size, tasks, easy, per_scene, turns, varied):
        buf = io.BytesIO()
        scene.render().save(buf, format="PNG")
        atomic_write_bytes(out / path, buf.getvalue())
        data_lines += [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
        scene_lines.append(json.dumps({"image": path, **scene_to_dict(scene)}, sort_keys=True) + "\n")
    atomic_write_bytes(out / "scenes.jsonl", "".join(scene_lines).encode("utf-8"))
    atomic_write_bytes(out / "data.jsonl", "".join(data_lines).encode("utf-8"))
    return out / "data.jsonl"
