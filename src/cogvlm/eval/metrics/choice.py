"""Exact-match and multiple-choice metrics: GQA, ScienceQA, OCR-VQA.

None of these benchmarks has VQA-style answer processing. GQA: exact match after trimming,
lowercasing and dropping a trailing period (LLaVA-style). ScienceQA: the generated answer is
mapped to an option (its letter, "The answer is B", or the option's own text) and compared with
the right option. OCR-VQA: case-insensitive exact match ignoring surrounding whitespace and
punctuation (there is no official scorer).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase
_EDGES = string.whitespace + string.punctuation
_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?[.:)]?$")  # "B", "B.", "(B)"
_LETTER_LEAD = re.compile(r"^\(?([A-Z])[.:)]\s")  # "B. a cat", "(B) a cat", "B) a cat"
_ANSWER_IS = re.compile(r"\b[Aa]nswer is:?\s*\(?([A-Z])\b")  # "The answer is B."


def gqa_normalize(text: str) -> str:
    """Trimmed, lowercased, one trailing period removed."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def gqa_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(gqa_normalize(prediction) == gqa_normalize(answer))


def _words(text: str) -> str:
    """Lowercase words without surrounding punctuation, single-spaced."""
    return " ".join(text.lower().strip(_EDGES).split())


def scienceqa_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """The option index a generated answer picks, or None when it names none or several.

    Tried in order: a bare letter ("B", "(B)", "B."), a leading "B. ..." form, "the answer is B",
    the text of exactly one option (whole answer first, then contained as words).
    """
    text = prediction.strip()
    first_line = text.split("\n", 1)[0].strip()
    for pattern, target in ((_LETTER_ONLY, first_line), (_LETTER_LEAD, first_line), (_ANSWER_IS, text)):
        match = pattern.search(target)
        if match:
            index = LETTERS.index(match.group(1))
            return index if index < len(choices) else None
    said = _words(text)
    options = [_words(c) for c in choices]
    exact = [i for i, o in enumerate(options) if o and o == said]
    if exact:
        return exact[0] if len(exact) == 1 else None
    contained = [i for i, o in enumerate(options) if o and re.search(rf"\b{re.escape(o)}\b", said)]
    return contained[0] if len(contained) == 1 else None


def scienceqa_match(prediction: str, choices: Sequence[str], answer: int) -> float:
    """1.0 when the generated answer picks option `answer` (an index into `choices`)."""
    return float(scienceqa_choice(prediction, choices) == answer)


def ocrvqa_match(prediction: str, answer: str) -> float:
    """Case-insensitive exact match, ignoring surrounding whitespace and punctuation."""
    return float(_words(prediction) == _words(answer))
