"""What a batch job reads: image files, folders, manifests and WebDataset shards, as one list of items.

Every input becomes `Item`s with a stable id, which is what resume and sharding key on:
- an image file given directly: its path as given; a folder (recursive, by extension): the path
  relative to the folder;
- a manifest row (.jsonl, .csv, .parquet): its id column, else its image value as written;
- a WebDataset sample (.tar, members grouped by key): its `.json` member's id, else the key.

Relative image paths in a manifest are read from the manifest's folder. Manifest columns other than
the image, id and query columns are carried to the output; so are a WebDataset sample's `.json` fields.
Ids must be unique across the inputs (a clear error otherwise), so a resumed run knows what is done.
Nothing here opens an image: a missing or unreadable one is the run's business (the errors file).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import CogVLMError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".jsonl", ".csv", ".parquet")
#: Column names tried, in order, for a manifest's image when no --image-column is given.
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "file_name", "filename", "url", "image_url")
#: Columns every output row has; a manifest column of the same name would be overwritten.
OUTPUT_COLUMNS = ("id", "image", "query", "answer", "boxes", "width", "height", "model", "generation")
REMOTE_SCHEMES = ("http://", "https://", "data:")


@dataclass(frozen=True)
class Columns:
    """Which manifest columns hold the image (None: the first of IMAGE_COLUMNS present), id and query."""

    image: str | None = None
    id: str = "id"
    query: str = "query"


@dataclass(frozen=True)
class Item:
    """One image to answer about.

    `image` is the reference written to the output (a path, a URL, or `shard.tar#member`); `path`
    is where to read it (a local file, or the shard holding it, None for a URL); `span` is the
    (offset, size) of its bytes inside that shard. `query` is the row's own question (None: the
    job's); `extra` the columns carried through.
    """

    id: str
    image: str
    path: str | None = None
    span: tuple[int, int] | None = None
    query: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.path is None


def collect(inputs: Sequence[str | os.PathLike], columns: Columns = Columns()) -> list[Item]:
    """All items of the inputs, in order; a CogVLMError for an input that is missing or malformed."""
    items: list[Item] = []
    for source in inputs:
        items.extend(_expand(str(source), columns))
    _check_unique(items)
    return items


def _expand(source: str, columns: Columns) -> Iterator[Item]:
    if source.startswith(REMOTE_SCHEMES):
        yield Item(id=source, image=source)
        return
    if glob.has_magic(source):
        matches = sorted(glob.glob(source, recursive=True))
        if not matches:
            raise CogVLMError(f"{source}: no file matches this pattern")
        for match in matches:
            yield from _expand(match, columns)
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _folder(path)
    elif not path.exists():
        raise CogVLMError(f"{source}: no such file or folder")
    elif suffix in MANIFEST_EXTENSIONS:
        yield from _manifest(path, columns)
    elif suffix == ".tar":
        yield from _shard(path, columns)
    elif suffix in IMAGE_EXTENSIONS:
        yield Item(id=path.as_posix(), image=path.as_posix(), path=str(path))
    else:
        known = ", ".join(IMAGE_EXTENSIONS + MANIFEST_EXTENSIONS + (".tar",))
        raise CogVLMError(f"{source}: not an image, manifest or WebDataset shard (known: {known})")


def _folder(root: Path) -> Iterator[Item]:
    """Image files under `root` (recursive, sorted, so every process lists them alike)."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(folder) / name
                yield Item(id=path.relative_to(root).as_posix(), image=path.as_posix(), path=str(path))


# ---- manifests -----------------------------------------------------------------------------------


def _manifest(path: Path, columns: Columns) -> Iterator[Item]:
    rows = list(_manifest_rows(path))
    if not rows:
        return
    names = list(dict.fromkeys(k for row in rows for k in row))
    image_column = columns.image or next((c for c in IMAGE_COLUMNS if c in names), None)
    if image_column is None or image_column not in names:
        wanted = columns.image or " or ".join(IMAGE_COLUMNS)
        raise CogVLMError(f"{path}: no image column ({wanted}); its columns are {', '.join(map(str, names))}")
    _check_extra(path, [n for n in names if n not in (image_column, columns.id, columns.query)])
    for number, row in enumerate(rows, 1):
        value = row.get(image_column)
        if not isinstance(value, str) or not value:
            raise CogVLMError(f"{path}: row {number} has no image in column '{image_column}'")
        yield _row_item(row, value, _location(path.parent, value), columns, image_column)


def _manifest_rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from .extras import require

        parquet = require("pyarrow.parquet")
        try:
            yield from parquet.read_table(path).to_pylist()
        except OSError as e:
            raise CogVLMError(f"{path}: not a readable Parquet file ({e})") from None
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    else:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    raise CogVLMError(f"{path}:{number}: not a JSON object")
                yield row


def _location(folder: Path, value: str) -> str | None:
    """Where to read a manifest's image: None for a URL, else the path from the manifest's folder."""
    return None if value.startswith(REMOTE_SCHEMES) else str(folder / value)


def _row_item(
    row: dict[str, Any],
    image: str,
    path: str | None,
    columns: Columns,
    image_column: str,
    span: tuple[int, int] | None = None,
) -> Item:
    """A manifest row (or a shard sample's fields) as an item: id, query, and the rest carried."""
    ident = row.get(columns.id)
    query = row.get(columns.query)
    extra = {k: v for k, v in row.items() if k not in (image_column, columns.id, columns.query)}
    return Item(
        id=str(ident) if ident not in (None, "") else image,
        image=image,
        path=path,
        span=span,
        query=str(query) if query not in (None, "") else None,
        extra=extra,
    )


def _check_extra(source: Path, names: Iterable[str]) -> None:
    clash = [n for n in names if n in OUTPUT_COLUMNS]
    if clash:
        raise CogVLMError(
            f"{source}: column(s) {', '.join(clash)} would overwrite the output's; rename them "
            f"(the output has {', '.join(OUTPUT_COLUMNS)})"
        )


# ---- WebDataset shards ----------------------------------------------------------------------------


def _shard(path: Path, columns: Columns) -> Iterator[Item]:
    """One item per sample key: its image member, and the fields of its `.json` member."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    samples.setdefault(key, {})[f"{dot}{ext}".lower()] = member
            meta = {key: _json_member(tar, path, parts[".json"]) for key, parts in samples.items() if ".json" in parts}
    except tarfile.TarError as e:
        raise CogVLMError(f"{path}: not a readable uncompressed tar (WebDataset shards are plain .tar): {e}") from None
    for key, parts in samples.items():
        image = next((parts[ext] for ext in parts if ext.rsplit(".", 1)[-1] in _BARE_EXTENSIONS), None)
        if image is None:
            continue  # a key without an image (a stray file), as WebDataset readers skip it
        row = meta.get(key, {})
        _check_extra(path, [n for n in row if n not in (columns.id, columns.query)])
        row = {columns.id: key, **row}
        span = (image.offset_data, image.size)
        yield _row_item(row, f"{path.as_posix()}#{image.name}", str(path), columns, "", span)


_BARE_EXTENSIONS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def _json_member(tar: tarfile.TarFile, path: Path, member: tarfile.TarInfo) -> dict[str, Any]:
    try:
        data = json.loads(tar.extractfile(member).read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise CogVLMError(f"{path}#{member.name}: not a JSON object")
    return data


def _check_unique(items: Sequence[Item]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise CogVLMError(
                f"id '{item.id}' is given twice ({seen[item.id]} and {item.image}); ids must be unique "
                "(give the manifest an id column, or run the two inputs to different outputs)"
            )
        seen[item.id] = item.image
