"""A run's predictions on disk: appended as answers arrive, resumed after a crash, merged once.

`{task}-{split}.predictions.jsonl` has a first line {"settings": ...} and then {"id", "answer",
"raw"} per answer. A single process appends to it directly. Under a multi-process launch each
process appends to its own part, `{task}-{split}.predictions.part{rank}.jsonl` (same format), and
rank 0 merges the parts into the main file when all are done. A rerun, with any number of
processes, reads every file present, so nothing answered is asked again. Files of a run with
other settings are refused; a torn last line (a crash mid-write) is dropped.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CogVLMError
from ..fileio import atomic_write_text
from .tasks import Item, Task


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _differ(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Whether `key` differs: in one dict only, or in both with other values."""
    return (key in a, a.get(key)) != (key in b, b.get(key))


def _shown(settings: dict[str, Any], key: str) -> str:
    return repr(settings[key]) if key in settings else "absent"


class PredictionLog:
    """One predictions file (the main one or a process's part)."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings

    def read(self) -> dict[str, dict[str, Any]]:
        """The answer records by id (empty when there is no file); raises if the settings differ."""
        if not self.path.is_file():
            return {}
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        if not records:
            return {}
        self._check(records[0].get("settings", {}))
        return {r["id"]: r for r in records[1:] if "id" in r and "raw" in r}

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Replace the file atomically with the settings line and `rows`."""
        atomic_write_text(self.path, "".join([_json_line({"settings": self.settings}), *map(_json_line, rows)]))

    def resume(self) -> dict[str, str]:
        """Raw answers already logged, by id; the file is rewritten clean (settings + answers)."""
        rows = self.read()
        self.write(list(rows.values()))
        return {k: r["raw"] for k, r in rows.items()}

    def _check(self, logged: dict[str, Any]) -> None:
        """Refuse a file whose settings differ in any key of either run (a key one run lacks, such as
        a beam run's num_beams, differs), so greedy and beam answers never mix."""
        keys = dict.fromkeys([*self.settings, *logged])
        changed = [
            f"{k}: {_shown(logged, k)} != {_shown(self.settings, k)}" for k in keys if _differ(logged, self.settings, k)
        ]
        if changed:
            raise CogVLMError(
                f"{self.path}: predictions of another run ({'; '.join(changed)}); use another --out or delete the file"
            )

    @contextlib.contextmanager
    def appending(self, task: Task) -> Iterator[Callable[[Item, str], None]]:
        """The function that logs one answer, each line flushed as it is written."""
        with self.path.open("a", encoding="utf-8") as f:

            def append(item: Item, raw: str) -> None:
                f.write(_json_line({"id": item.id, "answer": task.clean(raw), "raw": raw}))
                f.flush()

            yield append


class RunPredictions:
    """The main predictions file of `{stem}` in `out` and the parts of a multi-process run."""

    def __init__(self, out: Path, stem: str, settings: dict[str, Any]) -> None:
        self.out, self.stem, self.settings = out, stem, settings
        self.main = PredictionLog(out / f"{stem}.predictions.jsonl", settings)

    def own(self, rank: int, size: int) -> PredictionLog:
        """The file process `rank` of `size` appends to: the main file when alone, else its part."""
        if size == 1:
            return self.main
        return PredictionLog(self.out / f"{self.stem}.predictions.part{rank}.jsonl", self.settings)

    def parts(self) -> list[PredictionLog]:
        """Every part present, also those of a run with more processes than this one."""
        paths = sorted(self.out.glob(f"{self.stem}.predictions.part*.jsonl"))
        return [PredictionLog(p, self.settings) for p in paths]

    def records(self) -> dict[str, dict[str, Any]]:
        """Every answer logged in the main file and the parts, by id (the first one read wins)."""
        rows: dict[str, dict[str, Any]] = {}
        for log in [self.main, *self.parts()]:
            for key, row in log.read().items():
                rows.setdefault(key, row)
        return rows

    def answered(self) -> dict[str, str]:
        """Raw answers by id, from every file."""
        return {k: r["raw"] for k, r in self.records().items()}

    def merge(self, items: Sequence[Item]) -> dict[str, str]:
        """Write every answer into the main file (the items' first, in their order; answers of
        other items, e.g. of a larger --limit, after them), remove the parts, return the raw
        answers by id. Raises if an item has no answer."""
        rows = self.records()
        missing = [i.id for i in items if i.id not in rows]
        if missing:
            raise CogVLMError(f"{len(missing)} questions have no answer after the run, e.g. {missing[0]!r}")
        ids = {i.id for i in items}
        self.main.write([rows[i.id] for i in items] + [r for k, r in rows.items() if k not in ids])
        for part in self.parts():
            part.path.unlink()
        return {k: r["raw"] for k, r in rows.items()}
