"""A batch job's settings (the same on every process and Ray actor) and the summary it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..generation import GenerationConfig
from ..prompts import TEMPLATES
from .sources import Item

#: The default question: the captioning prompt the shipped model was trained on.
CAPTION_QUERY = "Describe the image."


@dataclass(frozen=True)
class BatchJob:
    """What to ask about every image (a manifest row may bring its own query) and how.

    `generation`: GenerationConfig fields to change from the model's defaults; `model_name`: the
    model as the rows record it; `workers`: threads reading and resizing images ahead of the model.
    """

    query: str = CAPTION_QUERY
    template: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    model_name: str = "default"
    batch_size: int = 8
    workers: int = 4
    allow_remote_images: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SettingsError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.workers < 1:
            raise SettingsError(f"workers must be >= 1 (got {self.workers})")
        if self.template is not None and self.template not in TEMPLATES:
            raise SettingsError(f"template must be one of {', '.join(TEMPLATES)} (got {self.template})")
        unknown = set(self.generation) - set(GenerationConfig.__dataclass_fields__)
        if unknown:
            raise SettingsError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        GenerationConfig(**{k: v for k, v in self.generation.items() if k != "stop"})  # range checks

    def query_for(self, item: Item) -> str:
        return item.query or self.query


@dataclass
class Tally:
    """One process's numbers: rows written, failures, answering seconds and model-busy seconds."""

    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    busy: float = 0.0


@dataclass(frozen=True)
class BatchSummary:
    """What a run did: rows written now, ids already done, failures, and how fast.

    `seconds` is the answering time (model loading excluded); `busy_share` the part of it the model
    was computing rather than waiting for images (None on Ray, where actors keep their own time).
    """

    out: Path
    errors: Path | None
    done: int
    skipped: int
    failed: int
    seconds: float
    busy_share: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        busy = "" if self.busy_share is None else f", model busy {self.busy_share:.0%}"
        failures = f"; failures in {self.errors}" if self.errors else ""
        return (
            f"{self.done} done, {self.skipped} skipped, {self.failed} failed in {self.seconds:.1f} s "
            f"({self.images_per_s:.2f} images/s{busy}) -> {self.out}{failures}"
        )
