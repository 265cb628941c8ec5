"""ScienceQA, image subset (IMG): multiple-choice accuracy over the questions that have an image.

Prompt (`vqa` template): the hint as context, the question, the options as letters, and an
instruction to answer with the letter; 16 new tokens. The answer is mapped to an option by
`scienceqa_choice` (letter, "The answer is B", or the option's text). Breakdown by subject.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..metrics.choice import LETTERS, scienceqa_match
from . import Item, Paper, Task, layout, read_json

INSTRUCTION = "Answer with the option's letter from the given choices directly."


def format_query(hint: str, question: str, choices: Sequence[str]) -> str:
    """ "Context: {hint}\\n{question}\\nA. ..\\nB. ..\\n{INSTRUCTION}" (no context line without a hint)."""
    context = f"Context: {hint.strip()}\n" if hint and hint.strip() else ""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{question}\n{options}\n{INSTRUCTION}"


def load_scienceqa(data: Path, split: str) -> Iterator[Item]:
    """problems.json and pid_splits.json; images in images/{split}/{pid}/{image}."""
    problems_path, splits_path = data / "problems.json", data / "pid_splits.json"
    problems = read_json(problems_path)
    with layout(splits_path):
        pids = read_json(splits_path)[split]
    with layout(problems_path):
        for pid in pids:
            p = problems[pid]
            if not p.get("image"):  # the IMG subset only
                continue
            yield Item(
                id=str(pid),
                image=data / "images" / split / str(pid) / p["image"],
                query=format_query(p.get("hint", ""), p["question"], p["choices"]),
                target=(tuple(p["choices"]), int(p["answer"])),
                kind=p.get("subject", ""),
            )


def _score(item: Item, answer: str) -> float:
    choices, right = item.target
    return scienceqa_match(answer, choices, right)


TASKS = (
    Task(
        name="scienceqa",
        splits=("test", "val"),
        metric="accuracy",
        template="vqa",
        prompt=format_query("{hint}", "{question}", ["{option A}", "{option B}"]),
        max_new_tokens=16,
        load=load_scienceqa,
        clean=str.strip,
        score=_score,
        paper=(Paper("test", 91.2, "CogVLM-Chat, in its fine-tuning data"),),
        files="problems.json, pid_splits.json, images/{split}/{pid}/{image}",
    ),
)
