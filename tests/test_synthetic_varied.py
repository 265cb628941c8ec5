"""Varied scenes (`cogvlm.synthetic.make_varied_scene`): what they cover, that every shape shows, and
that the records asked about them are right; plain scenes and their records stay as released."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from cogvlm import synthetic as S
from cogvlm.synthetic import varied as V

BOX_RE = re.compile(r"\[\[(\d{3}),(\d{3}),(\d{3}),(\d{3})\]\]")


def _scenes(seed: int, n: int) -> list[S.Scene]:
    return [S.make_varied_scene(random.Random(f"{seed}:{i}")) for i in range(n)]


@pytest.fixture(scope="module")
def scenes() -> list[S.Scene]:
    return _scenes(3, 300)


def test_plain_scenes_and_records_are_those_released():
    """Digests of what the release before varied scenes drew (held-out records; ten rendered scenes)."""
    records = [r for _, _, rs in S.iter_scenes(999_999, 60, 224, per_scene=9) for r in rs]
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    assert digest == "79d6c083717c29b6929217613497a9c711fce3fcbaca039028288635a53707cf"
    pixels = b"".join(S.make_scene(random.Random(f"5:{i}"), 224).render().tobytes() for i in range(10))
    assert hashlib.sha256(pixels).hexdigest() == "d59a450ed12432ce5d49fefdae3e4f25605625da8c0b9a4b6bd57a798b1a9640"


def test_same_seed_same_pixels_and_records():
    a, b = _scenes(9, 5), _scenes(9, 5)
    assert a == b
    assert [s.render().tobytes() for s in a] == [s.render().tobytes() for s in b]
    assert _scenes(10, 5) != a


def test_coverage(scenes):
    shapes = [s for sc in scenes for s in sc.shapes]
    assert {s.kind for s in shapes} == set(S.KINDS)
    assert {s.color for s in shapes} == set(S.COLORS)
    assert {len(sc.shapes) for sc in scenes} >= {1, 2, 3, 4, 5, 6}
    looks = [sc.look for sc in scenes]
    assert sum(lk.gradient is not None for lk in looks) >= 30
    assert sum(max(lk.background) < 90 for lk in looks if lk.gradient is None) >= 30  # dark
    assert sum(lk.noise > 0 for lk in looks) >= 30 and sum(lk.jpeg_quality > 0 for lk in looks) >= 30
    assert sum(lk.supersample > 1 for lk in looks) >= 100
    assert sum(s.outline > 0 for s in shapes) >= 50
    assert sum(sc.width != sc.height for sc in scenes) >= 100
    assert any(len({s.name for s in sc.shapes}) < len(sc.shapes) for sc in scenes)  # a repeated name
    fractions = [
        max(s.box[2] - s.box[0], s.box[3] - s.box[1]) / min(sc.width, sc.height) for sc in scenes for s in sc.shapes
    ]
    assert min(fractions) < 0.07 and max(fractions) > 0.6


def test_geometry_canvas_and_contrast(scenes):
    for sc in scenes:
        assert V.ASPECTS[0] - 0.01 <= sc.width / sc.height <= V.ASPECTS[1] + 0.01
        boxes = [s.box for s in sc.shapes]
        for i, s in enumerate(sc.shapes):
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= sc.width and 0 <= y0 < y1 <= sc.height
            assert all(not S.scene.overlaps(s.box, b, 0) for b in boxes[i + 1 :])
            w, h = x1 - x0, y1 - y0
            if s.kind in ("rectangle", "ellipse"):
                assert max(w, h) / min(w, h) >= V.ELONGATION[0] - 0.3  # rounding of small shapes
            if s.kind in ("circle", "square"):
                assert w == h
            assert min(math.dist(s.rgb, b) for b in sc.look.background_colors()) >= V.MIN_CONTRAST
            assert math.dist(s.rgb, min(V.RENDERINGS[s.color], key=lambda r: math.dist(r, s.rgb))) <= 35


def test_every_shape_shows_in_the_pixels(scenes):
    """Inside each box some pixels are near the shape's colour (filled: most of the centre region)."""
    for sc in scenes[:120]:
        rgb = np.asarray(sc.render(), dtype=np.float32)
        assert rgb.shape == (sc.height, sc.width, 3)
        for s in sc.shapes:
            x0, y0, x1, y1 = s.box
            patch = rgb[y0:y1, x0:x1].reshape(-1, 3)
            near = np.linalg.norm(patch - np.array(s.rgb, dtype=np.float32), axis=1) < (
                90 if sc.look.jpeg_quality else 60
            )
            assert near.sum() >= max(1, 0.05 * len(patch)), (sc.look, s)
            if s.outline == 0 and min(x1 - x0, y1 - y0) >= 12:
                cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
                if s.kind in ("circle", "ellipse", "square", "rectangle"):
                    assert np.linalg.norm(rgb[cy, cx] - np.array(s.rgb)) < 60, (sc.look, s)


def test_dict_roundtrip(scenes):
    for sc in scenes[:20]:
        assert S.scene_from_dict(json.loads(json.dumps(S.scene_to_dict(sc)))) == sc


def _names(text: str) -> list[str]:
    return [
        f"{c} {k}" for c, k in re.findall(r"\b(" + "|".join(S.COLORS) + r") (" + "|".join(S.KINDS) + r")s?\b", text)
    ]


def _check(scene: S.Scene, task: str, q: str, a: str) -> None:
    """An independent reading of one question about a varied scene and its recorded answer."""
    shapes, names = scene.shapes, Counter(s.name for s in scene.shapes)
    kinds = [k for k in S.KINDS if re.search(rf"\b{k}s?\b", q)]
    colors = [c for c in S.COLORS if re.search(rf"\b{c}\b", q)]
    assert not re.search(r"\ba [aeiou]", q + " " + a), (q, a)  # "an orange", never "a orange"
    if task == "color":
        assert [s.color for s in shapes if s.kind == kinds[0]] == [a]
    elif task == "shape":
        assert [s.kind for s in shapes if s.color == colors[0]] == [a]
    elif task == "count":
        if kinds:
            want = sum(s.kind == kinds[0] for s in shapes)
        elif colors:
            want = sum(s.color == colors[0] for s in shapes)
        else:
            want = len(shapes)
        assert a == str(want), (q, a)
    elif task == "exist":
        if kinds and colors:
            there = names[f"{colors[0]} {kinds[0]}"] > 0
        elif kinds:
            there = any(s.kind == kinds[0] for s in shapes)
        else:
            there = any(s.color == colors[0] for s in shapes)
        negated = " no " in q or "without" in q
        assert a == ("yes" if there != negated else "no"), (q, a)
    elif task in ("relation", "position", "ground"):
        for name in _names(q):
            assert names[name] == 1, (q, "asked about a repeated name")
        if task == "ground":
            (m,) = BOX_RE.findall(a)
            s = next(s for s in shapes if s.name == _names(q)[0])
            true = (s.box[0] / scene.width, s.box[1] / scene.height, s.box[2] / scene.width, s.box[3] / scene.height)
            assert all(abs(int(v) - min(999, t * 1000)) <= 1 for v, t in zip(m, true))
        if task == "relation":
            sa, sb = (next(s for s in shapes if s.name == n) for n in _names(q))
            ax = 0 if ("left" in q or "right" in q) else 1
            before = sa.center[ax] < sb.center[ax]
            first = any(w in q for w in ("left", "above", "higher", "over", "further up"))
            assert a == ("yes" if before == first else "no"), (q, a)
    elif task == "absent":
        (name,) = _names(q)
        assert names[name] == 0 and a == f"there is {'no'} {name}." and "[[" not in a
    elif task in ("caption", "caption_vqa", "ground_caption"):
        assert sorted(_names(a)) == sorted(s.name for s in shapes)  # every shape named once
        assert ("[[" in a) == (task == "ground_caption")


def test_records_about_varied_scenes_are_right():
    seen: Counter = Counter()
    templates: Counter = Counter()
    for i in range(300):
        rng = random.Random(f"21:{i}")
        scene = S.make_varied_scene(rng)
        for rec in S.make_records(scene, rng, "x.png", S.ALL_TASKS, per_scene=len(S.ALL_TASKS), turns=3):
            conv = rec["conversations"]
            for k in range(0, len(conv), 2):
                q, a = conv[k]["content"], conv[k + 1]["content"]
                task = rec["task"] if k == 0 else _vqa_task(q)
                _check(scene, task, q, a)
                seen[task] += 1
            templates[(rec["task"], rec["template_version"])] += 1
    assert set(seen) == set(S.ALL_TASKS)
    assert templates[("caption", "chat")] > 100 and templates[("caption", "vqa")] == 0  # short answers stay short
    assert templates[("caption_vqa", "vqa")] > 100  # ... but for "Describe the image." asked as `cogvlm ask` asks
    assert templates[("absent", "base")] > 100


def _vqa_task(q: str) -> str:
    """The task of a follow-up turn, from its wording."""
    if q.startswith(("How many", "Count", "What is the number")):
        return "count"
    if re.search(r"\b(left|right|above|below|higher|lower|over|under|beneath|further)\b", q) and len(_names(q)) == 2:
        return "relation"
    if "top" in q or ("left" in q and "or" in q):
        return "position"
    if q.startswith(("Is ", "Are ", "Does ", "Can ", "Do ")):
        return "exist"
    if not any(re.search(rf"\b{w}\b", q) for w in (*S.KINDS, *S.COLORS)):
        return "caption_vqa"  # "Describe the image.", "What shapes are in the picture?"
    if any(re.search(rf"\b{k}\b", q) for k in S.KINDS):
        return "color"
    return "shape"


def test_negated_and_partial_existence_questions_occur_with_both_answers():
    answers: Counter = Counter()
    for i in range(400):
        rng = random.Random(f"31:{i}")
        scene = S.make_varied_scene(rng)
        for rec in S.make_records(scene, rng, "x.png", ["exist"], per_scene=1):
            q, a = (t["content"] for t in rec["conversations"])
            form = "not" if (" no " in q or "without" in q) else "pair" if len(_names(q)) == 1 else "partial"
            answers[(form, a)] += 1
    for form in ("not", "pair", "partial"):
        assert answers[(form, "yes")] >= 10 and answers[(form, "no")] >= 10, answers


def test_training_source_draws_varied_scenes():
    from cogvlm.config import get_preset
    from cogvlm.train.data import build_source

    config = get_preset("tiny")
    source = build_source(
        {"type": "synthetic", "seed": 4, "varied": True, "tasks": ["absent"], "per_scene": 1}, config, 0
    )
    conv = source[0]
    scene = S.make_varied_scene(random.Random("4:0"))  # scene k of seed s comes from Random(f"{s}:{k}")
    assert conv.image.tobytes() == scene.render().tobytes()
    assert conv.turns[0][1].startswith("there is no ") and conv.template_version == "base"
    with pytest.raises(Exception, match="unknown task"):
        build_source({"type": "synthetic", "tasks": ["nope"]}, config, 0)


def test_default_varied_scenes_are_those_the_shipped_stages_drew(scenes):
    """Digest of what the release before `max_aspect` drew (canvases and shapes of 300 scenes)."""
    drawn = repr([(sc.width, sc.height, sc.shapes) for sc in scenes]).encode()
    assert hashlib.sha256(drawn).hexdigest() == "b2acf3a433100378f8d54d5e9fe35b50aac696a32ff1e72b191b9b3e31ed2042"


def test_max_aspect_narrows_the_canvases():
    from cogvlm.config import get_preset
    from cogvlm.train.config import TrainError
    from cogvlm.train.data import build_source
    from cogvlm.train.patches import PatchDataset

    spec = {"type": "synthetic", "seed": 4, "varied": True, "max_aspect": 4 / 3, "per_scene": 1, "tasks": ["count"]}
    source = build_source(spec, get_preset("tiny"), 0)
    aspects = [w / h for w, h in (source[k].image.size for k in range(200))]
    assert 0.75 - 0.01 <= min(aspects) < 0.8 and 1.28 < max(aspects) <= 4 / 3 + 0.01
    assert sum(a == 1.0 for a in aspects) >= 40  # squares stay
    default = [sc.width / sc.height for sc in _scenes(4, 200)]
    assert max(default) > 1.4  # the default keeps its wider canvases
    for bad, message in ((dict(spec, varied=False), "varied scenes only"), (dict(spec, max_aspect=3), "max_aspect 3")):
        with pytest.raises(TrainError, match=message):
            build_source(bad, get_preset("tiny"), 0)
        with pytest.raises(TrainError, match=message):
            patch_spec = {k: v for k, v in bad.items() if k in ("type", "seed", "varied", "max_aspect")}
            PatchDataset([patch_spec], get_preset("tiny"), 0)


def _square_share_by_area(scenes: list[S.Scene]) -> tuple[float, float]:
    """Among squares and rectangles: the share of squares with sqrt-area under 12% and over 20% of
    the canvas's shorter side."""
    small, large = Counter(), Counter()
    for sc in scenes:
        side = min(sc.width, sc.height)
        for s in sc.shapes:
            if s.kind in ("square", "rectangle"):
                size = math.sqrt((s.box[2] - s.box[0]) * (s.box[3] - s.box[1])) / side
                band = small if size < 0.12 else large if size > 0.2 else None
                if band is not None:
                    band[s.kind] += 1
    return small["square"] / sum(small.values()), large["square"] / sum(large.values())


def test_match_area_takes_away_the_size_that_tells_a_square_from_a_rectangle():
    """By the longer side (the default) a big rectilinear shape is mostly a square, which a model
    learns instead of looking at the sides; `match_area` sizes rectangles and ellipses by area as
    squares and circles are, their sides still 1.9-3.2 to one."""
    from cogvlm.config import get_preset
    from cogvlm.train.config import TrainError
    from cogvlm.train.data import build_source
    from cogvlm.train.patches import PatchDataset

    matched = [S.make_varied_scene(random.Random(f"9:{i}"), match_area=True) for i in range(1500)]
    small, large = _square_share_by_area(matched)
    assert 0.4 < small < 0.6 and 0.4 < large < 0.6, (small, large)
    assert _square_share_by_area(_scenes(9, 1500))[1] > 0.75  # the default: big means square
    for sc in matched:
        for s in sc.shapes:
            w, h = s.box[2] - s.box[0], s.box[3] - s.box[1]
            assert 0 <= s.box[0] and s.box[2] <= sc.width and 0 <= s.box[1] and s.box[3] <= sc.height
            if s.kind in ("rectangle", "ellipse") and min(w, h) > 10:
                assert 1.8 < max(w, h) / min(w, h) < 3.4, (w, h)
    spec = {"type": "synthetic", "seed": 9, "varied": True, "match_area": True, "per_scene": 1, "tasks": ["count"]}
    source = build_source(spec, get_preset("tiny"), 0)
    assert source[5].image.tobytes() == matched[5].render().tobytes()
    bad_specs = ((dict(spec, varied=False), "varied scenes only"), (dict(spec, match_area="yes"), "match_area"))
    for bad, message in bad_specs:
        with pytest.raises(TrainError, match=message):
            build_source(bad, get_preset("tiny"), 0)
        with pytest.raises(TrainError, match=message):
            patch_spec = {k: v for k, v in bad.items() if k in ("type", "seed", "varied", "match_area")}
            PatchDataset([patch_spec], get_preset("tiny"), 0)
