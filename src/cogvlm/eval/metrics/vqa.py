"""VQA accuracy, as the official evaluation computes it, and the EvalAI variant.

Official (GT-Vision-Lab `vqaEval.py`, current master; VQAv2 and OK-VQA): newlines and tabs become
spaces and everything is stripped; then, *only when the ground-truth answers are not all
identical*, the prediction and every answer go through `process_punctuation` and
`process_digit_article`. So "Yes" scores 0 against ten "yes": a quirk kept on purpose, as are
the period regex (its lookbehind is a typo) and its `count` of 32 (`re.UNICODE` passed as count).

EvalAI (mmf `EvalAIAnswerProcessor`; TextVQA and VizWiz): every answer and the prediction are
always lowercased, lose ',' and '?', get "'s" split off, then the same two steps with a
different comma rule. "unanswerable" is an ordinary answer.

The score is min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: The official contractions table, entries that can never match (capitalised keys) and the
#: reversed "somebody'd" included.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# "(?!<=\d)" was meant as a lookbehind; as written it never excludes anything.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as `count`
COMMA_OFFICIAL = re.compile(r"(\d)(,)(\d)")
COMMA_EVALAI = re.compile(r"(?<=\d)(,)+(?=\d)")
PROCESSORS = ("official", "evalai")


def process_punctuation(text: str, comma: re.Pattern[str] = COMMA_OFFICIAL) -> str:
    """Delete each listed mark when it touches a space anywhere in `text` (or when `text` has a
    digit-comma-digit anywhere), else replace it by a space; then drop periods not before a digit."""
    out = text
    delete_all = comma.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase, number words to digits, articles dropped, contraction spellings fixed."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _flatten_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_normalize(text: str) -> str:
    """The EvalAI/mmf answer processor (applied to every answer, always)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_flatten_whitespace(text), COMMA_EVALAI))


def leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over each answer left out of min(#remaining answers equal to `prediction` / 3, 1)."""
    matches = sum(a == prediction for a in answers)
    return sum(min(1.0, (matches - (a == prediction)) / 3) for a in answers) / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], processor: str = "official") -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    `processor`: "official" (VQAv2, OK-VQA) or "evalai" (TextVQA, VizWiz; see the module doc).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if processor == "official":
        prediction = _flatten_whitespace(prediction)
        answers = [_flatten_whitespace(a) for a in answers]
        if len(set(answers)) > 1:
            answers = [process_digit_article(process_punctuation(a)) for a in answers]
            prediction = process_digit_article(process_punctuation(prediction))
    elif processor == "evalai":
        prediction = evalai_normalize(prediction)
        answers = [evalai_normalize(a) for a in answers]
    else:
        raise ValueError(f"unknown processor {processor!r}; expected one of {PROCESSORS}")
    return leave_one_out(prediction, answers)


_ANSWER_PREFIX = re.compile(r"^(?:short answer|answer)\s*:\s*", re.IGNORECASE)


def clean_short_answer(text: str) -> str:
    """A generated short answer as the scorers expect it: the first line, without a leading
    "Answer:" / "Short answer:" and without a trailing period."""
    line = text.strip().split("\n", 1)[0]
    line = _ANSWER_PREFIX.sub("", line.strip()).strip()
    return line[:-1].rstrip() if line.endswith(".") else line
