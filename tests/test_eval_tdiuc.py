"""TDIUC: golden tests of its metrics (every expected value worked out by hand in the comment
beside it), the loader on a fixture in the official layout, and a scored run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cogvlm.errors import CogVLMError
from cogvlm.eval import get_task, load_items, run
from cogvlm.eval.metrics.tdiuc import QUESTION_TYPES, harmonic_mean, tdiuc_match, tdiuc_scores

# (question type, ground truth, prediction)
COLOR = [
    ("color", "red", "red"),  # right
    ("color", "red", "blue"),  # wrong
    ("color", "red", "Red."),  # right: case and a trailing period do not count
    ("color", "blue", "blue"),  # right
    ("color", "blue", " blue "),  # right
]  # 4 / 5 = 0.8; normalised: red 2/3, blue 2/2 -> (2/3 + 1) / 2 = 5/6
COUNTING = [
    ("counting", "2", "2"),  # right
    ("counting", "2", "two"),  # wrong: no number-word mapping in TDIUC
    ("counting", "3", "3"),  # right
    ("counting", "4", "5"),  # wrong
]  # 2 / 4 = 0.5; normalised: "2" 1/2, "3" 1/1, "4" 0/1 -> (0.5 + 1 + 0) / 3 = 0.5
ABSURD = [("absurd", "doesnotapply", "no")] * 2  # 0 / 2; normalised 0


def test_the_twelve_question_types():
    assert len(QUESTION_TYPES) == 12 == len(set(QUESTION_TYPES))
    assert {"object_presence", "counting", "color", "absurd", "utility_affordance"} <= set(QUESTION_TYPES)


def test_match_is_exact_after_trimming_lowercasing_and_a_period():
    assert tdiuc_match("Yes.", "yes") == 1.0
    assert tdiuc_match("  tennis ", "tennis") == 1.0
    assert tdiuc_match("two", "2") == 0.0
    assert tdiuc_match("a dog", "dog") == 0.0
    assert tdiuc_match("", "dog") == 0.0


def test_harmonic_mean():
    assert harmonic_mean([0.8, 0.5]) == pytest.approx(2 / (1.25 + 2))  # 8/13
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([0.9, 0.0]) == 0.0  # a type at 0: the limit of the script's epsilon
    with pytest.raises(ValueError):
        harmonic_mean([])


def test_mean_per_type_and_normalised_by_hand():
    scores, per_type = tdiuc_scores(COLOR + COUNTING)
    assert per_type == {"counting": 0.5, "color": pytest.approx(0.8)}  # in QUESTION_TYPES order
    assert scores == pytest.approx(
        {
            "accuracy": 6 / 9,  # 4 + 2 right of 9
            "A-MPT": 0.65,  # (0.8 + 0.5) / 2
            "H-MPT": 8 / 13,  # 2 / (1/0.8 + 1/0.5) = 2 / 3.25
            "A-NMPT": 2 / 3,  # (5/6 + 1/2) / 2
            "H-NMPT": 0.625,  # 2 / (6/5 + 2) = 2 / 3.2
        }
    )


def test_a_type_at_zero_sinks_the_harmonic_means():
    scores, per_type = tdiuc_scores(COLOR + COUNTING + ABSURD)
    assert per_type == {"counting": 0.5, "color": pytest.approx(0.8), "absurd": 0.0}
    assert scores == pytest.approx(
        {
            "accuracy": 6 / 11,
            "A-MPT": 1.3 / 3,  # (0.8 + 0.5 + 0) / 3
            "H-MPT": 0.0,
            "A-NMPT": 4 / 9,  # (5/6 + 1/2 + 0) / 3
            "H-NMPT": 0.0,
        }
    )


def test_equals_the_evaluation_scripts_formula_with_its_epsilon():
    # the script: per-type accuracy in percent plus 1e-10, then the arithmetic and harmonic means
    eps = 1e-10
    percent = [80 + eps, 50 + eps]
    script_harmonic = len(percent) / sum(1 / p for p in percent) / 100
    scores, _ = tdiuc_scores(COLOR + COUNTING)
    assert scores["H-MPT"] == pytest.approx(script_harmonic, rel=1e-9)
    assert scores["A-MPT"] == pytest.approx(sum(percent) / 2 / 100, rel=1e-9)


def test_no_questions_is_an_error():
    with pytest.raises(ValueError):
        tdiuc_scores([])


# ----------------------------------------------------------------------------- the task
QUESTIONS = [
    (101, 7, "What color is the bus?", "color", "red"),
    (102, 7, "How many people are there?", "counting", "2"),
    (103, 8, "What color is the kite?", "color", "blue"),
    (104, 8, "What sport is this?", "sport_recognition", "tennis"),
]


@pytest.fixture
def tdiuc_dir(tmp_path: Path) -> Path:
    """A 4-question TDIUC val2014 folder in the official layout."""
    data = tmp_path / "TDIUC"
    (data / "Questions").mkdir(parents=True)
    (data / "Annotations").mkdir()
    (data / "Images" / "val2014").mkdir(parents=True)
    questions = [{"question_id": q, "image_id": i, "question": text} for q, i, text, _, _ in QUESTIONS]
    annotations = [
        {
            "question_id": q,
            "image_id": i,
            "question_type": kind,
            "ans_source": "generation",
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": 1}],
        }
        for q, i, _, kind, answer in QUESTIONS
    ]
    (data / "Questions" / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    (data / "Annotations" / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    for image_id in (7, 8):
        Image.new("RGB", (8, 8)).save(data / "Images" / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return data


def test_loader_reads_the_official_layout(tdiuc_dir):
    task = get_task("tdiuc")
    items, skipped = load_items(task, tdiuc_dir, "val2014")
    assert skipped == 0
    assert [(i.id, i.query, i.target, i.kind) for i in items] == [
        (str(q), text, answer, kind) for q, _, text, kind, answer in QUESTIONS
    ]
    assert items[2].image == tdiuc_dir / "Images" / "val2014" / "COCO_val2014_000000000008.jpg"


def test_a_question_without_annotation_is_named(tdiuc_dir):
    path = tdiuc_dir / "Annotations" / "mscoco_val2014_annotations.json"
    content = json.loads(path.read_text())
    content["annotations"] = content["annotations"][1:]
    path.write_text(json.dumps(content))
    with pytest.raises(CogVLMError, match="no annotation for question 101"):
        load_items(get_task("tdiuc"), tdiuc_dir, "val2014")


class Answers:
    """Answers by question text: the bus right, the people wrong, the kite right, the sport wrong."""

    REPLIES = {
        "What color is the bus?": "Red.",
        "How many people are there?": "two",
        "What color is the kite?": "blue",
        "What sport is this?": "baseball",
    }

    def batch(self, requests, **gen):
        assert gen == {"max_new_tokens": 16, "do_sample": False} and all(
            r["template_version"] == "vqa" for r in requests
        )
        return [self.REPLIES[r["query"]] for r in requests]


def test_a_run_reports_every_tdiuc_score(tdiuc_dir, tmp_path):
    task = get_task("tdiuc")
    items, _ = load_items(task, tdiuc_dir, "val2014")
    result = run(task, items, Answers(), split="val2014", model="fake", out=tmp_path / "out", progress=False)
    # color 2/2 = 1 (normalised: red 1, blue 1 -> 1); counting 0/1; sport 0/1
    assert result["per_type"] == {"counting": 0.0, "color": 1.0, "sport_recognition": 0.0}
    assert result["scores"] == pytest.approx(
        {"accuracy": 0.5, "A-MPT": 1 / 3, "H-MPT": 0.0, "A-NMPT": 1 / 3, "H-NMPT": 0.0}
    )
    assert result["metric"] == "accuracy"
    assert result["counts"]["per_type"] == {"color": 2, "counting": 1, "sport_recognition": 1}
