"""TDIUC's metrics (Kafle & Kanan, "An Analysis of Visual Question Answering Algorithms", ICCV 2017).

TDIUC sorts its questions into 12 types, and simple accuracy over all of them is dominated by the
large, easy types (object presence, absurd). The dataset's evaluation therefore reports, besides
simple accuracy, the mean of the per-type accuracies (mean-per-type, MPT) both as an arithmetic
and as a harmonic mean (the harmonic one punishes a weak type), and "normalised" variants where
each type's accuracy is first averaged over its answer classes, so a type's frequent answers
("yes", "2") do not dominate it either. As the evaluation script (`mean_per_class`) computes them:
- per-type accuracy: right / asked, over the questions of the type;
- per-type normalised accuracy: for each distinct ground-truth answer of the type, right / asked
  over the questions with that answer; then the mean over those answers;
- A-MPT, H-MPT: arithmetic and harmonic mean of the per-type accuracies, over the types present;
  A-NMPT, H-NMPT: the same over the normalised accuracies;
- accuracy: right / asked over all questions.
The script adds 1e-10 (on its 0-100 scale) to every type before the means so that a type at 0
does not divide by zero; its harmonic mean is then about 1e-9. Here that limit is written as 0.
Answers are compared after trimming, lowercasing and dropping a trailing period (the script
compares a classifier's answer strings as they are, which a generated answer needs first). The
script also counts as wrong every question whose answer is missing from the classifier's answer
vocabulary; a generative model has no such vocabulary, so no question is excluded that way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from statistics import fmean

from .choice import gqa_normalize

#: The 12 question types, as the annotations' `question_type` spells them.
QUESTION_TYPES = (
    "object_presence",
    "object_recognition",  # the paper's "subordinate object recognition"
    "counting",
    "color",
    "attribute",  # "other attributes"
    "activity_recognition",
    "sport_recognition",
    "positional_reasoning",
    "scene_recognition",
    "sentiment_understanding",
    "utility_affordance",
    "absurd",
)


def tdiuc_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the answer after trimming, lowercasing and dropping a period."""
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


def harmonic_mean(values: Iterable[float]) -> float:
    """n / sum(1 / v); 0 when any value is 0 (the limit the evaluation script's epsilon approaches)."""
    values = list(values)
    if not values:
        raise ValueError("the harmonic mean of no values")
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


def tdiuc_scores(rows: Iterable[tuple[str, str, str]]) -> tuple[dict[str, float], dict[str, float]]:
    """({"accuracy", "A-MPT", "H-MPT", "A-NMPT", "H-NMPT"}, per-type accuracy) of rows
    (question type, ground-truth answer, prediction); fractions in [0, 1]."""
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))  # type -> answer -> hits
    for kind, answer, prediction in rows:
        hits[kind][gqa_normalize(answer)].append(tdiuc_match(prediction, answer))
    if not hits:
        raise ValueError("no questions to score")
    kinds = sorted(hits, key=lambda k: (QUESTION_TYPES.index(k) if k in QUESTION_TYPES else len(QUESTION_TYPES), k))
    per_type = {kind: fmean(h for answers in hits[kind].values() for h in answers) for kind in kinds}
    normalised = [fmean(fmean(answers) for answers in hits[kind].values()) for kind in kinds]
    scores = {
        "accuracy": fmean(h for by_answer in hits.values() for answers in by_answer.values() for h in answers),
        "A-MPT": fmean(per_type.values()),
        "H-MPT": harmonic_mean(per_type.values()),
        "A-NMPT": fmean(normalised),
        "H-NMPT": harmonic_mean(normalised),
    }
    return scores, per_type
