"""The output of a batch job: crash-safe journals while it runs, one file at the end, and resume.

While a job runs, each process appends its rows to its own journal in `OUT.parts/`
(`rows-RANK.jsonl`, failures in `errors-RANK.jsonl`): a chunk of whole lines in one write, then
fsync, so a killed process leaves at most a torn last line, which readers ignore and the journal's
next owner cuts off before it appends. At the end one process merges everything into OUT (JSON
Lines, or Parquet by extension) and OUT.errors.jsonl, each written atomically (fileio), and removes
the journals.

Resume: the ids done are those in OUT and in every journal, whatever number of processes wrote
them; a rerun answers only the rest. Failures are retried on every run, so the errors file holds
the failures of the latest run. Rows follow the order of the inputs; rows of ids no longer in the
inputs are kept, after them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import CogVLMError
from ..fileio import atomic_write, atomic_write_text
from .extras import require

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


def read_journal(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a JSON Lines file and the bytes they take (a torn last line is left out)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise CogVLMError(f"{path}:{number}: not a JSON line (use --overwrite to start over)") from None
    return rows, end


class Journal:
    """One process's append-only JSON Lines file: each chunk is whole lines written at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            _, end = read_journal(path)
            if end < path.stat().st_size:  # a torn line from a killed run: cut before appending
                os.truncate(path, end)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        data = "".join(json_line(row) for row in rows).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if data:
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class OutputStore:
    """OUT, OUT.errors.jsonl and the journals folder OUT.parts/ of one job."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.format = FORMATS.get(self.out.suffix.lower())
        if self.format is None:
            raise CogVLMError(f"--out {out}: use a .jsonl or .parquet file")
        if self.format == "parquet":
            require("pyarrow.parquet", "Parquet output")
        if not self.out.parent.is_dir():
            raise CogVLMError(f"--out {out}: no such folder {self.out.parent}")
        self.errors = self.out.with_name(self.out.name + ".errors.jsonl")
        self.parts = self.out.with_name(self.out.name + ".parts")

    def reset(self) -> None:
        """Start over (--overwrite): remove the output, its errors file and its journals."""
        for path in (self.out, self.errors):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def done_ids(self) -> set[str]:
        """Ids already answered: in OUT and in any process's journal."""
        return {str(row["id"]) for row in self._existing()} | {
            str(row["id"]) for path in self._journals("rows") for row in read_journal(path)[0]
        }

    def journals(self, rank: int) -> tuple[Journal, Journal]:
        """This process's (rows, errors) journals."""
        self.parts.mkdir(exist_ok=True)
        return Journal(self.parts / f"rows-{rank}.jsonl"), Journal(self.parts / f"errors-{rank}.jsonl")

    def merge(self, order: Sequence[str]) -> int:
        """Write OUT and OUT.errors.jsonl from everything done; remove the journals; the failure count."""
        rows = {str(row["id"]): row for row in self._existing()}
        for path in self._journals("rows"):
            for row in read_journal(path)[0]:
                rows.setdefault(str(row["id"]), row)
        failures: dict[str, dict[str, Any]] = {}
        for path in self._journals("errors"):
            failures |= {str(e["id"]): e for e in read_journal(path)[0] if str(e["id"]) not in rows}
        self._write(_ordered(rows, order))
        if failures:
            atomic_write_text(self.errors, "".join(json_line(e) for e in _ordered(failures, order)))
        else:
            self.errors.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)
        return len(failures)

    # ---- OUT itself ------------------------------------------------------------------------------

    def _journals(self, kind: str) -> list[Path]:
        return sorted(self.parts.glob(f"{kind}-*.jsonl")) if self.parts.is_dir() else []

    def _existing(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        if self.format == "parquet":
            parquet = require("pyarrow.parquet", "Parquet output")
            try:
                rows = parquet.read_table(self.out).to_pylist()
            except Exception as e:  # pyarrow raises several types for a file that is not Parquet
                raise CogVLMError(f"{self.out}: not a readable Parquet file ({e}); use --overwrite") from None
        else:
            rows = read_journal(self.out)[0]
        if any("id" not in row for row in rows):
            raise CogVLMError(f"{self.out}: not the output of a batch job (rows without an id); use --overwrite")
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            atomic_write_text(self.out, "".join(json_line(row) for row in rows))
            return
        pa = require("pyarrow", "Parquet output")
        parquet = require("pyarrow.parquet", "Parquet output")
        names = list(dict.fromkeys(k for row in rows for k in row))
        try:
            table = pa.Table.from_pylist([{n: row.get(n) for n in names} for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise CogVLMError(f"{self.out}: the rows do not fit one Parquet table ({e}); use a .jsonl output") from None
        atomic_write(self.out, lambda tmp: parquet.write_table(table, tmp))


def json_line(row: dict[str, Any]) -> str:
    """One JSON line; values JSON has no type for (a Parquet manifest's dates) as their text."""
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def _ordered(rows: dict[str, dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """Rows in the order of `order`, then the others as they came."""
    position = {ident: i for i, ident in enumerate(order)}
    return sorted(rows.values(), key=lambda row: position.get(str(row["id"]), len(position)))
