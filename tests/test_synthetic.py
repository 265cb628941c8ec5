"""Tests for cogvlm.synthetic: determinism, visibility, coverage and answer correctness."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cogvlm import synthetic as S
from cogvlm.synthetic import records as R

BOX_RE = re.compile(r"\[\[(\d{3}),(\d{3}),(\d{3}),(\d{3})\]\]")


def _scenes(seed: int, n: int, size: int = 224, **kw):
    return [S.make_scene(random.Random(f"{seed}:{i}"), size, **kw) for i in range(n)]


def _norm(box, scene):
    w, h = scene.width, scene.height
    return [box[0] / w * 1000, box[1] / h * 1000, box[2] / w * 1000, box[3] / h * 1000]


def _by_name(scene):
    return {s.name: s for s in scene.shapes}


# ----------------------------------------------------------------------------- determinism
def test_iter_samples_deterministic_and_seed_dependent():
    a = list(S.iter_samples(7, 6, size=96))
    b = list(S.iter_samples(7, 6, size=96))
    c = list(S.iter_samples(8, 6, size=96))
    assert [r for _, r in a] == [r for _, r in b]
    assert all(ia.tobytes() == ib.tobytes() for (ia, _), (ib, _) in zip(a, b))
    assert [r for _, r in a] != [r for _, r in c]
    assert any(ia.tobytes() != ic.tobytes() for (ia, _), (ic, _) in zip(a, c))


def test_write_dataset_byte_identical(tmp_path):
    p1 = S.write_dataset(tmp_path / "a", 5, seed=3, size=96)
    p2 = S.write_dataset(tmp_path / "b", 5, seed=3, size=96)
    p3 = S.write_dataset(tmp_path / "c", 5, seed=4, size=96)
    assert p1.read_bytes() == p2.read_bytes() != p3.read_bytes()
    assert (p1.parent / "scenes.jsonl").read_bytes() == (p2.parent / "scenes.jsonl").read_bytes()
    for img in sorted((p1.parent / "images").iterdir()):
        assert img.read_bytes() == (p2.parent / "images" / img.name).read_bytes()


def test_scene_i_independent_of_other_scenes():
    many = list(S.iter_scenes(11, 5, size=96, per_scene=5))
    few = list(S.iter_scenes(11, 5, size=96, per_scene=1, tasks=["count"]))
    assert [s for _, s, _ in many] == [s for _, s, _ in few]


# ----------------------------------------------------------------------------- scenes
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([64, 128, 224]), easy=st.booleans())
def test_every_shape_visible_inside_and_disjoint(seed, size, easy):
    scene = S.make_scene(random.Random(seed), size, easy=easy)
    assert 1 <= len(scene.shapes) <= (2 if easy else 4)
    img = np.asarray(scene.render())
    assert img.shape == (size, size, 3)
    assert len({(s.color, s.kind) for s in scene.shapes}) == len(scene.shapes)
    for i, s in enumerate(scene.shapes):
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert s.center == ((x0 + x1) / 2, (y0 + y1) / 2)
        region = img[y0:y1, x0:x1].astype(int)
        match = np.abs(region - np.array(scene.shape_rgb(i))).sum(-1) <= 6
        assert (np.abs(np.array(scene.shape_rgb(i)) - S.COLORS[s.color]) <= S.COLOR_JITTER).all()
        # Star is the sparsest shape (~45% of its box); allow a safety margin.
        assert match.mean() > 0.3, (s, match.mean())
        # Tight box: the shape touches every side of its box.
        assert match[0].any() and match[-1].any() and match[:, 0].any() and match[:, -1].any()
    for i, a in enumerate(scene.shapes):
        for b in scene.shapes[i + 1 :]:
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_easy_scenes_are_large_on_white():
    for scene in _scenes(5, 30, easy=True):
        assert scene.background == "white" and 1 <= len(scene.shapes) <= 2
        assert all(s.size == "large" for s in scene.shapes)


def test_shape_geometry():
    for scene in _scenes(9, 100):
        for s in scene.shapes:
            w, h = s.box[2] - s.box[0], s.box[3] - s.box[1]
            if s.kind == "rectangle":
                assert max(w, h) / min(w, h) > 1.7
            elif s.kind in ("square", "circle"):
                assert w == h


def test_coverage_over_many_scenes():
    scenes = _scenes(1, 200)
    shapes = [s for sc in scenes for s in sc.shapes]
    assert {s.color for s in shapes} == set(S.COLORS)
    assert {s.kind for s in shapes} == set(S.PLAIN_KINDS)
    assert {s.size for s in shapes} == {"small", "medium", "large"}
    assert {len(sc.shapes) for sc in scenes} == {1, 2, 3, 4}
    assert len({sc.background for sc in scenes}) >= 6
    for required in ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown"):
        assert required in S.COLORS


def test_palette_distinct_from_backgrounds():
    cols = list(S.COLORS.values())
    for i, a in enumerate(cols):
        for b in cols[i + 1 :]:
            assert sum(abs(x - y) for x, y in zip(a, b)) >= 80
        for bg in S.BACKGROUNDS.values():
            assert sum(abs(x - y) for x, y in zip(a, bg)) >= 150


def test_scene_dict_roundtrip():
    for scene in _scenes(2, 10):
        d = json.loads(json.dumps(S.scene_to_dict(scene)))
        assert S.scene_from_dict(d) == scene


# ----------------------------------------------------------------------------- records
def _check_answer(scene, rec):
    q, a = rec["conversations"][0]["content"], rec["conversations"][1]["content"]
    task, shapes, names = rec["task"], scene.shapes, _by_name(scene)
    assert a == a.lower() or task in ("ground", "ground_caption")
    assert rec["template_version"] == S.TEMPLATE_OF_TASK[task]
    if task == "color":
        (kind,) = [k for k in S.KINDS if re.search(rf"\b{k}\b", q)]
        assert [s.color for s in shapes if s.kind == kind] == [a]
    elif task == "shape":
        (color,) = [c for c in S.COLORS if re.search(rf"\b{c}\b", q)]
        assert [s.kind for s in shapes if s.color == color] == [a]
    elif task == "count":
        kinds = [k for k in S.KINDS if re.search(rf"\b{k}s\b", q)]
        colors = [c for c in S.COLORS if re.search(rf"\b{c}\b", q)]
        if kinds:
            want = sum(s.kind == kinds[0] for s in shapes)
        elif colors:
            want = sum(s.color == colors[0] for s in shapes)
        else:
            want = len(shapes)
        assert a == str(want)
    elif task == "exist":
        (pair,) = S.parse_caption_objects(q)
        assert a == ("yes" if pair in {(s.color, s.kind) for s in shapes} else "no")
    elif task == "position":
        (name,) = [n for n in names if f"the {n} " in q]
        s = names[name]
        if a in ("left", "right"):
            assert "left" in q and (s.center[0] < scene.width / 2) == (a == "left")
            assert abs(s.center[0] - scene.width / 2) >= 0.08 * scene.width
        else:
            assert a in ("top", "bottom") and "top" in q
            assert (s.center[1] < scene.height / 2) == (a == "top")
            assert abs(s.center[1] - scene.height / 2) >= 0.08 * scene.height
    elif task == "relation":
        first, second = sorted((n for n in names if f"the {n}" in q), key=q.index)
        sa, sb = names[first], names[second]
        ax = 0 if ("left" in q or "right" in q) else 1
        assert abs(sa.center[ax] - sb.center[ax]) >= 0.1 * (scene.width, scene.height)[ax]
        before = sa.center[ax] < sb.center[ax]
        truth = before if any(w in q for w in ("left", "above", "higher", "over")) else not before
        assert a == ("yes" if truth else "no")
    elif task in ("caption", "caption_vqa"):
        assert S.parse_caption_objects(a) == {(s.color, s.kind) for s in shapes}
        assert a.endswith(".") and "[[" not in a
    elif task == "ground":
        (name,) = [n for n in names if f"the {n}" in q]
        assert a.startswith(f"the {name}[[")
        (m,) = BOX_RE.findall(a)
        true = _norm(names[name].box, scene)
        assert all(abs(int(v) - min(t, 999)) <= 1 for v, t in zip(m, true))
    elif task == "ground_caption":
        assert S.parse_caption_objects(a) == {(s.color, s.kind) for s in shapes}
        pieces = re.findall(r"(\w+) (\w+)\[\[(\d{3}),(\d{3}),(\d{3}),(\d{3})\]\]", a)
        assert len(pieces) == len(shapes)
        for color, kind, *vals in pieces:
            true = _norm(names[f"{color} {kind}"].box, scene)
            assert all(abs(int(v) - min(t, 999)) <= 1 for v, t in zip(vals, true))
    else:  # pragma: no cover
        pytest.fail(f"unknown task {task}")


def test_answers_match_scene():
    seen = Counter()
    for path, scene, records in S.iter_scenes(21, 250, per_scene=4):
        for rec in records:
            assert rec["image"] == path
            assert [t["role"] for t in rec["conversations"]] == ["user", "assistant"]
            _check_answer(scene, rec)
            seen[rec["task"]] += 1
    assert set(seen) == set(S.TASKS)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([64, 224, 490]))
def test_answers_match_scene_property(seed, size):
    rng = random.Random(seed)
    scene = S.make_scene(rng, size)
    for rec in S.make_records(scene, rng, "images/x.png", per_scene=len(S.TASKS)):
        _check_answer(scene, rec)


def test_phrasings_vary():
    questions: dict[str, set[str]] = {}
    for _, _, records in S.iter_scenes(4, 300, per_scene=3):
        for rec in records:
            q = rec["conversations"][0]["content"]
            questions.setdefault(rec["task"], set()).add(re.sub(r"\b(" + "|".join(S.COLORS) + r")\b", "C", q))
    for task in ("color", "shape", "caption", "ground", "ground_caption", "position", "exist"):
        assert len({re.sub(r"\b(" + "|".join(S.KINDS) + r")s?\b", "K", q) for q in questions[task]}) >= 3


def test_exist_balanced_and_count_zero_occurs():
    exist = [
        r["conversations"][1]["content"] for _, _, rs in S.iter_scenes(5, 300, tasks=["exist"], per_scene=1) for r in rs
    ]
    assert len(exist) == 300
    assert 0.35 <= exist.count("yes") / 300 <= 0.65
    counts = Counter(
        r["conversations"][1]["content"] for _, _, rs in S.iter_scenes(6, 300, tasks=["count"], per_scene=1) for r in rs
    )
    assert {"0", "1", "2", "3", "4"} <= set(counts)


def test_records_respect_task_list():
    for _, _, records in S.iter_scenes(8, 40, tasks=["caption", "ground"], per_scene=2):
        assert {r["task"] for r in records} <= {"caption", "ground"}
        assert len(records) == 2
    with pytest.raises(ValueError):
        S.make_records(_scenes(0, 1)[0], random.Random(0), "x.png", tasks=["nope"])


def _task_of(question: str) -> str:
    """The task type whose phrasing a question uses (relations and counts under one name)."""
    for key, phrases in R._VARIED_PHRASES.items():
        for phrase in phrases:
            pattern = re.escape(phrase)
            for slot in ("k", "c", "o", "a", "b"):
                pattern = pattern.replace(re.escape("{" + slot + "}"), ".+")
            if re.fullmatch(pattern, question):
                return {"left": "relation", "right": "relation", "above": "relation", "below": "relation"}.get(
                    key, key.split("_")[0] if key != "ground_caption" else key
                )
    raise AssertionError(f"no phrasing matches {question!r}")


def test_heldout_records_unchanged_by_multi_turn_option():
    """turns=1 draws exactly what releases before the option drew: held-out scores stay comparable."""
    records = [r for _, _, rs in S.iter_scenes(999_999, 60, per_scene=len(S.TASKS)) for r in rs]
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    assert digest == "79d6c083717c29b6929217613497a9c711fce3fcbaca039028288635a53707cf"


def test_multi_turn_records_ask_distinct_correct_questions():
    lengths = Counter()
    plain = [scene for _, scene, _ in S.iter_scenes(21, 150, per_scene=4)]
    for (path, scene, records), same in zip(S.iter_scenes(21, 150, per_scene=4, turns=6), plain):
        assert scene == same  # the scene does not depend on the number of turns
        for rec in records:
            conv = rec["conversations"]
            assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
            questions = [t["content"] for t in conv[::2]]
            assert len(set(questions)) == len(questions) <= 6
            if rec["template_version"] != "vqa":
                assert len(conv) == 2
            for k, (q, a) in enumerate(zip(conv[::2], conv[1::2])):
                task = rec["task"] if k == 0 else _task_of(q["content"])
                assert k == 0 or S.TEMPLATE_OF_TASK[task] == "vqa"
                _check_answer(
                    scene, {"conversations": [q, a], "task": task, "template_version": S.TEMPLATE_OF_TASK[task]}
                )
            lengths[(rec["template_version"], len(conv) // 2)] += 1
    vqa = {n: c for (t, n), c in lengths.items() if t == "vqa"}
    assert vqa.get(6, 0) > 0.9 * sum(vqa.values())


def _relation_parts(question: str) -> tuple[str, str, str]:
    """(word, first name, second name) of a relation question, read back from its phrasing."""
    for word in S.RELATIONS:
        for phrase in R._VARIED_PHRASES[word]:
            pattern = re.escape(phrase).replace(re.escape("{a}"), r"(\w+ \w+)").replace(re.escape("{b}"), r"(\w+ \w+)")
            if m := re.fullmatch(pattern, question):
                return word, m.group(1), m.group(2)
    raise AssertionError(f"no relation phrasing matches {question!r}")


@pytest.mark.parametrize("words", [("left", "above"), ("right",), ("below", "left")])
def test_relations_option_asks_only_those_words_and_answers_them(words):
    """A stage can ask each comparison one way (no XOR of word and comparison to learn first)."""
    seen = Counter()
    for varied in (False, True):
        for i in range(60):
            rng = random.Random(f"5:{i}")
            scene = S.draw_scene(rng, 224, varied=varied, min_shapes=2)
            names = Counter(s.name for s in scene.shapes)
            for rec in S.make_records(scene, rng, "x.png", ["relation"], 2, 3, relations=words):
                conv = rec["conversations"]
                for q, a in zip(conv[::2], conv[1::2]):
                    word, first, second = _relation_parts(q["content"])
                    assert word in words and names[first] == names[second] == 1
                    sa, sb = (next(s for s in scene.shapes if s.name == n) for n in (first, second))
                    ax, sign = {"left": (0, 1), "right": (0, -1), "above": (1, 1), "below": (1, -1)}[word]
                    assert a["content"] == ("yes" if sign * (sb.center[ax] - sa.center[ax]) > 0 else "no")
                    seen[word, a["content"]] += 1
    assert {w for w, _ in seen} == set(words) and {a for _, a in seen} == {"yes", "no"}
    with pytest.raises(ValueError, match="relations"):
        S.make_records(scene, rng, "x.png", ["relation"], relations=["up"])
    with pytest.raises(ValueError, match="relations"):
        S.make_records(scene, rng, "x.png", ["relation"], relations=[])


def test_relations_option_of_a_training_source():
    from cogvlm.config import get_preset
    from cogvlm.train.config import TrainError
    from cogvlm.train.data import build_source

    spec = {"type": "synthetic", "seed": 3, "min_shapes": 2, "per_scene": 1, "tasks": ["relation"]}
    source = build_source(dict(spec, relations=["right"]), get_preset("tiny"), 0)
    asked = {_relation_parts(source[k].turns[0][0])[0] for k in range(40)}
    assert asked == {"right"}
    for bad in (["up"], [], "left"):
        with pytest.raises(TrainError, match="relations"):
            build_source(dict(spec, relations=bad), get_preset("tiny"), 0)


def test_caption_vqa_is_the_caption_as_a_short_answer_inside_vqa_conversations():
    """`cogvlm ask` asks "Describe the image." with the vqa template: `caption_vqa` trains that answer."""
    firsts, later = 0, 0
    for _, scene, records in S.iter_scenes(31, 80, tasks=["caption_vqa", "color"], per_scene=2, turns=3, varied=True):
        for rec in records:
            assert rec["template_version"] == "vqa"
            turns = list(zip(rec["conversations"][::2], rec["conversations"][1::2]))
            for k, (q, a) in enumerate(turns):
                if _task_of(q["content"]) == "caption":
                    assert a["content"] == R._articles(S.make_caption(scene))  # "an orange ..." in varied scenes
                    firsts, later = firsts + (k == 0), later + (k > 0)
            if rec["task"] == "caption_vqa":
                assert _task_of(turns[0][0]["content"]) == "caption"
                _check_answer(scene, rec)  # reads the first turn
    assert firsts > 20 and later > 20  # asked first and as a follow-up question


def test_a_task_named_twice_is_drawn_twice_as_often():
    tasks = Counter(
        r["task"] for _, _, rs in S.iter_scenes(9, 600, tasks=["caption", "caption", "ground"], per_scene=1) for r in rs
    )
    assert 1.6 <= tasks["caption"] / tasks["ground"] <= 2.5


def test_format_box_and_caption_parser():
    assert S.format_box((0, 0, 224, 224), 224, 224) == "[[000,000,999,999]]"
    assert S.format_box((22, 56, 112, 100), 224, 200) == "[[098,280,500,500]]"
    assert S.parse_caption_objects("A large Red circle, a blue star[[001,002,003,004]] and two green squares.") == {
        ("red", "circle"),
        ("blue", "star"),
        ("green", "square"),
    }
    assert S.parse_caption_objects("nothing here") == set()


# ----------------------------------------------------------------------------- writer
def test_write_dataset_files(tmp_path):
    out = tmp_path / "ds"
    path = S.write_dataset(out, 4, seed=0, size=64, per_scene=2)
    assert path == out / "data.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(scenes) == 4 and len(records) == 8
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "images", "scenes.jsonl"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    for rec in records:
        assert not rec["image"].startswith("/") and (out / rec["image"]).is_file()
    for sc in scenes:
        assert sc["width"] == sc["height"] == 64 and (out / sc["image"]).is_file()
        assert all({"kind", "color", "size", "box"} <= set(s) for s in sc["shapes"])
        on_disk = Image.open(out / sc["image"]).convert("RGB")
        assert S.scene_from_dict(sc).render().tobytes() == on_disk.tobytes()
    # Rewriting in place leaves no temp files behind.
    S.write_dataset(out, 4, seed=0, size=64, per_scene=2)
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "images", "scenes.jsonl"]
