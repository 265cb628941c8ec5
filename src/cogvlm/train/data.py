"""Training data: conversations from JSONL, the CogVLM-SFT-311K folder layout or the synthetic
generator, turned into token sequences whose labels cover only what the assistant says.

One example per conversation (chat and vqa templates): the prompt that
`build_conversation_input_ids` makes for the LAST user turn, with all earlier turns as history,
followed by the last answer and eos. Earlier answers already sit inside that prompt text exactly
as the template writes them (`Question: q Answer: a\\n`), so their tokens are labelled where they
stand: one sequence trains every assistant turn, and the model sees the very tokens it sees at
inference. The base template ignores history, so a base conversation becomes one example per
turn. Labels are -100 on the image, the prompt text, the template's separators and padding.

Every source is indexable by any non-negative integer: finite sources walk a fresh permutation
each epoch, the synthetic source renders scene `i // per_scene` on demand. With several sources
a per-index draw (seeded) picks one by weight. A sample is therefore a pure function of its
index, which is what makes resuming exact and the batches independent of the process count.

A bad record (bad JSON, missing or wrong fields, missing or unreadable image, too long) is
logged once as a one-line warning naming its file and line, and skipped. Files are checked when
read; images are decoded when an example is built, where a bad one falls through to the next
index (so batches keep their size and stay a function of the index).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .. import synthetic
from ..config import LANGUAGE_TOKEN_TYPE, CogVLMConfig
from ..errors import CogVLMError
from ..image import ImageInput
from ..prompts import TEMPLATES, build_conversation_input_ids, format_prompt
from .config import TrainError

logger = logging.getLogger("cogvlm.train")
IGNORE_INDEX = -100
#: Seed offset that turns a synthetic training source into a held-out one.
HELDOUT_SEED_OFFSET = 1_000_003
_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One image (path, PIL image or None) and its (question, answer) turns; `origin` is file:line."""

    image: ImageInput | None
    turns: tuple[tuple[str, str], ...]
    template_version: str
    origin: str


class RecordError(ValueError):
    """A record that cannot be trained on; its message is the one-line reason."""


_reported: set[str] = set()


def report(origin: str, reason: str, every_rank: bool = False) -> None:
    """Warn once per origin (file:line) and process that a record is skipped, and why. Problems
    every process finds while reading files are reported by rank 0 only."""
    if origin not in _reported and (every_rank or os.environ.get("RANK", "0") == "0"):
        _reported.add(origin)
        logger.warning("%s: skipped: %s", origin, reason)


# ----------------------------------------------------------------------------- records
def parse_turns(messages: Any, user: str = "user", assistant: str = "assistant") -> list[tuple[str, str]]:
    """[{role, content}, ...] alternating user/assistant -> [(question, answer), ...]."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("conversation is missing or empty")
    if len(messages) % 2:
        raise RecordError("conversation has an odd number of messages (it must end with the assistant)")
    texts = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        expected = (user, assistant)[i % 2]
        if role != expected:
            raise RecordError(f"message {i + 1} has role {role!r}, expected {expected!r}")
        if not isinstance(content, str):
            raise RecordError(f"message {i + 1} has no text 'content'")
        texts.append(content)
    return list(zip(texts[::2], texts[1::2]))


def split_conversation(
    image: ImageInput | None, turns: Sequence[tuple[str, str]], template: str, origin: str
) -> list[Conversation]:
    """One Conversation, or one per turn for the base template (which drops history)."""
    if template not in TEMPLATES:
        raise RecordError(f"unknown template_version {template!r} (use {', '.join(TEMPLATES)})")
    if template == "base":
        return [Conversation(image, (turn,), template, origin) for turn in turns]
    return [Conversation(image, tuple(turns), template, origin)]


def _image_path(value: Any, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RecordError("'image' must be a path string or null")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise RecordError(f"image not found: {path}")
    return path


def read_jsonl(path: str | Path, template_version: str | None, default_template: str) -> list[Conversation]:
    """Conversations of a JSONL file ({image, conversations, template_version?} per line)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such data file")
    out: list[Conversation] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise RecordError("a record must be a JSON object")
                if "image" not in record:
                    raise RecordError("missing field 'image' (use null for a text-only record)")
                image = _image_path(record["image"], path.parent)
                template = template_version or record.get("template_version") or default_template
                out += split_conversation(image, parse_turns(record.get("conversations")), template, origin)
            except RecordError as e:
                report(origin, str(e))
    return out


def read_sft311k(folder: str | Path, template_version: str | None, default_template: str) -> list[Conversation]:
    """Conversations of the official fine-tuning demo's layout: images/NAME.jpg + labels/NAME.json."""
    folder = Path(folder)
    if not (folder / "labels").is_dir():
        raise TrainError(f"{folder}: no labels/ folder (expected images/NAME.jpg + labels/NAME.json)")
    out: list[Conversation] = []
    for label in sorted((folder / "labels").glob("*.json")):
        origin = str(label)
        try:
            try:
                record = json.loads(label.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                origin = f"{label}:{e.lineno}"
                raise RecordError(f"not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "captions" not in record:
                raise RecordError("missing field 'captions'")
            images = sorted((folder / "images").glob(f"{glob.escape(label.stem)}.*"))
            if not images:
                raise RecordError(f"image not found: {folder / 'images' / label.stem}.*")
            turns = parse_turns(record["captions"], "User", "Assistant")
            out += split_conversation(images[0], turns, template_version or default_template, origin)
        except RecordError as e:
            report(origin, str(e))
    return out


# ----------------------------------------------------------------------------- sources
class FiniteSource:
    """A list of conversations seen in a new seeded order every epoch; any index is valid."""

    def __init__(self, items: list[Conversation], seed: int, name: str) -> None:
        if not items:
            raise TrainError(f"{name}: no usable records")
        self.items, self.seed = items, seed
        self._epoch, self._order = -1, []

    def __getitem__(self, index: int) -> Conversation:
        epoch, offset = divmod(index, len(self.items))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.items), generator=generator).tolist()
        return self.items[self._order[offset]]


def check_shape_counts(min_shapes: int, max_shapes: int | None, varied: bool) -> None:
    """TrainError unless 1 <= min_shapes <= max_shapes (None: the generator's most) <= that most."""
    most = synthetic.varied.MAX_SHAPES if varied else synthetic.MAX_SHAPES
    if not 1 <= min_shapes <= most:
        raise TrainError(f"data source synthetic: min_shapes {min_shapes} (use 1 to {most})")
    if max_shapes is not None and not min_shapes <= max_shapes <= most:
        raise TrainError(f"data source synthetic: max_shapes {max_shapes} (use min_shapes {min_shapes} to {most})")


def check_varied_options(max_aspect: float | None, match_area: bool, varied: bool) -> None:
    """The options of a synthetic source that only varied scenes take: `max_aspect` 1 (square
    canvases) to 2, `match_area` true or false."""
    for name, value in (("max_aspect", max_aspect), ("match_area", match_area)):
        if value not in (None, False) and not varied:
            raise TrainError(f"data source synthetic: {name} applies to varied scenes only (add varied: true)")
    if not isinstance(match_area, bool):
        raise TrainError(f"data source synthetic: match_area {match_area!r} (use true or false)")
    if max_aspect is None:
        return
    if not isinstance(max_aspect, (int, float)) or not 1.0 <= max_aspect <= 2.0:
        raise TrainError(f"data source synthetic: max_aspect {max_aspect} (use 1 to 2)")


class SyntheticSource:
    """Infinite in-memory shape scenes: item i is record i % per_scene of scene i // per_scene.

    Scene k is drawn from `random.Random(f"{seed}:{k}")` as `cogvlm.synthetic` does, so the
    records equal those `iter_samples(seed, ...)` / `write_dataset` give for the same options.
    """

    def __init__(
        self,
        seed: int,
        size: int,
        tasks: Sequence[str] | None = None,
        easy: bool = False,
        per_scene: int = 3,
        turns: int = 1,
        template_version: str | None = None,
        min_shapes: int = 1,
        varied: bool = False,
        max_aspect: float | None = None,
        relations: Sequence[str] = synthetic.RELATIONS,
        max_shapes: int | None = None,
        match_area: bool = False,
    ) -> None:
        check_shape_counts(min_shapes, max_shapes, varied)
        check_varied_options(max_aspect, match_area, varied)
        for task in tasks or ():
            if task not in synthetic.ALL_TASKS:
                raise TrainError(f"data source synthetic: unknown task {task!r} (use {', '.join(synthetic.ALL_TASKS)})")
        try:
            synthetic.check_relations(relations)
        except ValueError as e:
            raise TrainError(f"data source synthetic: {e}") from None
        self.seed, self.size, self.tasks, self.turns = seed, size, tasks, turns
        self.min_shapes, self.max_shapes, self.varied = min_shapes, max_shapes, varied
        self.max_aspect, self.match_area, self.relations = max_aspect, match_area, relations
        self.easy, self.per_scene, self.template_version = easy, per_scene, template_version
        self._last: tuple[int, Any, list[dict]] = (-1, None, [])

    def scene(self, k: int) -> tuple[Any, list[dict]]:
        """Scene k's image and records (the last one is kept: its records are consecutive)."""
        if self._last[0] != k:
            rng = random.Random(f"{self.seed}:{k}")
            options = {
                "min_shapes": self.min_shapes,
                "max_shapes": self.max_shapes,
                "max_aspect": self.max_aspect,
                "match_area": self.match_area,
            }
            scene = synthetic.draw_scene(rng, self.size, varied=self.varied, easy=self.easy, **options)
            records = synthetic.make_records(
                scene, rng, f"images/{k:06d}.png", self.tasks, self.per_scene, self.turns, self.relations
            )
            self._last = (k, scene.render(), records)
        return self._last[1], self._last[2]

    def __getitem__(self, index: int) -> Conversation:
        k = index // self.per_scene
        image, records = self.scene(k)
        while not records:  # a scene where no requested task applies: take the next one
            k += 1
            image, records = self.scene(k)
        record = records[index % self.per_scene % len(records)]
        template = self.template_version or record["template_version"]
        turns = parse_turns(record["conversations"])
        return split_conversation(image, turns, template, f"synthetic:{self.seed}:{k}")[-1]


def build_source(spec: dict, config: CogVLMConfig, seed: int, heldout: bool = False) -> FiniteSource | SyntheticSource:
    """A source from its config dict ({type: jsonl | sft311k | synthetic, ...})."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    spec.pop("weight", None)
    template = spec.pop("template_version", None)
    try:
        if kind == "synthetic":
            offset = HELDOUT_SEED_OFFSET if heldout else 0
            return SyntheticSource(
                int(spec.pop("seed", seed)) + offset,
                spec.pop("size", None) or config.vision_config.image_size,
                template_version=template,
                **spec,
            )
        if kind in ("jsonl", "sft311k"):
            path = spec.pop("path")
            if spec:
                raise TypeError(f"unexpected option(s) {', '.join(spec)}")
            read = read_jsonl if kind == "jsonl" else read_sft311k
            return FiniteSource(read(path, template, config.template_version), seed, str(path))
    except KeyError as e:
        raise TrainError(f"data source {kind}: missing option {e}") from None
    except TypeError as e:
        raise TrainError(f"data source {kind}: {e}") from None
    raise TrainError(f"data source type {kind!r} (use jsonl, sft311k or synthetic)")


# ----------------------------------------------------------------------------- examples
def _history_spans(
    tokenizer: Any, turns: Sequence[tuple[str, str]], template: str, text_ids: list[int]
) -> list[tuple[int, int]]:
    """Token spans, within the prompt text, of each earlier answer as the template wrote it.

    A span is used only where the tokenisation of the text before and through the answer is a
    prefix of the whole prompt's (true at word boundaries for SentencePiece); otherwise that
    earlier answer is left unlabelled rather than labelled wrongly.
    """
    spans = []
    for k, (question, answer) in enumerate(turns[:-1]):
        prompt = format_prompt(question, turns[:k], template)  # ends with the answer tag
        before, through = tokenizer.encode(prompt), tokenizer.encode(f"{prompt} {answer}")
        if text_ids[: len(before)] == before and text_ids[: len(through)] == through:
            spans.append((len(before), len(through)))
    return spans


def build_example(conv: Conversation, tokenizer: Any, config: CogVLMConfig, max_length: int) -> dict[str, Any]:
    """input_ids, token_type_ids, attention_mask, labels (T,) and images for one conversation."""
    *history, (query, answer) = conv.turns
    prompt = build_conversation_input_ids(
        tokenizer,
        config,
        query=query,
        history=history,
        images=None if conv.image is None else [conv.image],
        template_version=conv.template_version,
    )
    target = list(tokenizer.encode(answer)) + [tokenizer.eos_token_id]
    n_prompt = len(prompt["input_ids"])
    if n_prompt + len(target) > max_length:
        raise RecordError(f"{n_prompt + len(target)} tokens is over max_length {max_length}")
    labels = torch.full((n_prompt + len(target),), IGNORE_INDEX, dtype=torch.long)
    labels[n_prompt:] = torch.tensor(target)
    text_ids = tokenizer.encode(format_prompt(query, history, conv.template_version))
    text_start = n_prompt - len(text_ids)
    for start, end in _history_spans(tokenizer, conv.turns, conv.template_version, text_ids):
        labels[text_start + start : text_start + end] = prompt["input_ids"][text_start + start : text_start + end]
    extra = torch.tensor(target)
    return {
        "input_ids": torch.cat((prompt["input_ids"], extra)),
        "token_type_ids": torch.cat((prompt["token_type_ids"], torch.full_like(extra, LANGUAGE_TOKEN_TYPE))),
        "attention_mask": torch.ones(n_prompt + len(target), dtype=torch.long),
        "labels": labels,
        "images": prompt["images"],
    }


def pick_source(seed: int, index: int, weights: Sequence[float]) -> int:
    """Which source global item `index` comes from: a weighted draw that depends on (seed, index) only."""
    if len(weights) == 1:
        return 0
    return random.Random(f"{seed}:mix:{index}").choices(range(len(weights)), weights)[0]


class TrainDataset(Dataset):
    """Examples by global index over weighted sources; a bad record falls through to the next index."""

    MAX_SKIPS = 1000

    def __init__(
        self,
        sources: Sequence[Any],
        weights: Sequence[float],
        tokenizer: Any,
        config: CogVLMConfig,
        max_length: int,
        seed: int,
    ) -> None:
        self.sources, self.weights = list(sources), list(weights)
        self.tokenizer, self.config, self.max_length, self.seed = tokenizer, config, max_length, seed

    def conversation(self, index: int) -> Conversation:
        return self.sources[pick_source(self.seed, index, self.weights)][index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        for i in range(index, index + self.MAX_SKIPS):
            conv = self.conversation(i)
            try:
                return build_example(conv, self.tokenizer, self.config, self.max_length)
            except (RecordError, CogVLMError) as e:  # CogVLMError: unreadable image, bad prompt
                report(conv.origin, str(e).removeprefix(f"{conv.image}: "), every_rank=True)
        raise TrainError(f"no usable example among indices {index}..{index + self.MAX_SKIPS - 1}")


def build_dataset(
    specs: Sequence[dict], tokenizer: Any, config: CogVLMConfig, max_length: int, seed: int, heldout: bool = False
) -> TrainDataset:
    """The dataset of a config's `data` (or `eval_data`) list."""
    sources = [build_source(spec, config, seed, heldout) for spec in specs]
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    return TrainDataset(sources, weights, tokenizer, config, max_length, seed)


# ----------------------------------------------------------------------------- batches
def collate(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad examples into (B, T) tensors (pad id, type 0, mask 0, label -100); images as
    the official per-sample lists. Right padding keeps every real token's position unchanged."""
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack(
            [torch.cat((e[key], torch.full((length - len(e[key]),), value, dtype=torch.long))) for e in examples]
        )

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "token_type_ids": pad("token_type_ids", LANGUAGE_TOKEN_TYPE),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
        "images": [list(e["images"] or []) for e in examples],
    }


class MicroBatchSampler(Sampler):
    """Index lists for this process, forever, from micro-step `start` on.

    Micro-step s takes the global indices [s * B * W, (s + 1) * B * W); process r gets the r-th
    slice of B. So W processes with batch B see the same samples as one process with batch B * W.
    """

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            first = (step * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


__all__ = [
    "Conversation",
    "RecordError",
    "read_jsonl",
    "read_sft311k",
    "FiniteSource",
    "SyntheticSource",
    "check_varied_options",
    "build_source",
    "build_example",
    "pick_source",
    "TrainDataset",
    "build_dataset",
    "collate",
    "MicroBatchSampler",
    "IGNORE_INDEX",
    "HELDOUT_SEED_OFFSET",
]
