"""The shipped default model on pictures drawn with plain PIL calls (`tests/drawn.py`, which does not
use `cogvlm.synthetic`): a fast subset of the full table in the model card (`python tests/drawn.py
--n 300`), each type held to a floor with a stated binomial margin."""

from __future__ import annotations

import math

import pytest

import cogvlm
from drawn import questions, score

N = 60  # questions per type (seed 7; the model card's table uses 300 of seed 1)
#: Per type: what the shipped model scores on these N questions (measured 2026-12-06 on the weights
#: of `deep1`, configs/tiny-shapes-deep.yaml; issue 22's targets are colour 0.95, shape 0.90,
#: count 0.90, existence 0.90 both ways, relations 0.85, boxes 0.65, "none" for absent shapes 0.80,
#: and the shipped model does not meet them yet). The floor is that less two binomial standard
#: errors at N questions (at least 0.026 each side), so a real regression fails; the questions and
#: greedy answers are fixed, so a rerun cannot.
MEASURED: dict[str, float] = {
    "color": 0.917,
    "shape": 0.767,
    "count": 0.683,
    "exist_yes": 0.95,
    "exist_no": 0.85,
    "relation": 0.767,
    "ground": 0.433,
    "absent": 0.75,
    "caption": 0.317,
}


def margin(p: float, n: int = N) -> float:
    """Two standard errors of an accuracy p measured on n questions."""
    return 2 * math.sqrt(max(p * (1 - p), 0.01) / n)


@pytest.fixture(scope="module")
def drawn_scores() -> dict[str, float]:
    return score(cogvlm.load(device="cpu"), questions(N, seed=7))


def test_drawn_pictures_per_type(drawn_scores):
    low = {
        t: (round(drawn_scores[t], 3), round(p - margin(p), 3))
        for t, p in MEASURED.items()
        if drawn_scores[t] < p - margin(p)
    }
    assert not low, f"below the floor (score, floor): {low}; all: {drawn_scores}"
