"""Text sources: folders of parquet, jsonl or txt files, read as a stream of documents.

Every source is a `DataSource`: an ordered list of files per split. A file is read in *units* —
a parquet row group, 1024 lines of jsonl, or one whole txt file — so that a reader can resume
at any unit and distributed ranks can share units out. Splits follow one rule for every source:
`train/` and `val/` subfolders when they exist, otherwise the last file (in name order) is the
validation split, as in the FineWeb-Edu shard convention.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from nanochat.config import home
from nanochat.data.offline import build_offline_corpus
from nanochat.errors import NanochatError

Split = Literal["train", "val"]
SUFFIXES = (".parquet", ".jsonl", ".txt")
JSONL_UNIT = 1024


class DataError(NanochatError):
    """Unreadable or malformed data; the message names the file."""


@dataclass(frozen=True)
class DataSource:
    name: str
    train_files: tuple[Path, ...]
    val_files: tuple[Path, ...]
    text_field: str = "text"
    """Parquet column / jsonl field holding the document text."""
    skip_bad: bool = False
    """Warn and skip unreadable files or records instead of stopping."""

    def files(self, split: Split) -> tuple[Path, ...]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        return self.train_files if split == "train" else self.val_files

    def units(self, path: Path, start: int = 0) -> Iterator[list[str]]:
        """The documents of one file, a unit (row group / line chunk / file) at a time, from
        unit `start` on."""
        try:
            if path.suffix == ".parquet":
                yield from _parquet_units(path, self.text_field, start)
            elif path.suffix == ".jsonl":
                yield from itertools.islice(_jsonl_units(path, self.text_field), start, None)
            elif start == 0:
                yield [_read_txt(path)]
        except DataError as e:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipping the rest of {path}: {e}", stacklevel=2)

    def documents(self, split: Split, rank: int = 0, world_size: int = 1) -> Iterator[str]:
        """Every document of a split once, in order. With several ranks, units are dealt out
        round-robin, so each rank reads a disjoint part and together they read everything."""
        unit_index = 0
        for path in self.files(split):
            for unit in self.units(path):
                if unit_index % world_size == rank:
                    yield from unit
                unit_index += 1


def _parquet_units(path: Path, column: str, start: int = 0) -> Iterator[list[str]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged footers
        raise DataError(f"{path} is not a readable parquet file ({e}); delete it and download it again") from e
    if column not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        "choose one with --text-field")
    for i in range(start, pf.num_row_groups):
        try:
            texts = pf.read_row_group(i, columns=[column]).column(column).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: row group {i} cannot be read ({e})") from e
        yield [t for t in texts if t]


def _jsonl_units(path: Path, field: str) -> Iterator[list[str]]:
    unit: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not valid JSON/UTF-8 ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno}: no string field {field!r}; choose one with --text-field")
            unit.append(record[field])
            if len(unit) == JSONL_UNIT:
                yield unit
                unit = []
    if unit:
        yield unit


def _read_txt(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))


def folder_source(path: str | Path, text_field: str = "text", skip_bad: bool = False) -> DataSource:
    """A local folder (or single file pair) of parquet / jsonl / txt files."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        train, val = _data_files(folder / "train"), _data_files(folder / "val")
    else:
        files = _data_files(folder)
        if len(files) < 2:
            raise DataError(f"{folder} needs at least two data files ({', '.join(SUFFIXES)}), the last one "
                            "being the validation split, or train/ and val/ subfolders")
        train, val = files[:-1], files[-1:]
    if not train or not val:
        raise DataError(f"{folder}: the train/ and val/ subfolders must each hold at least one data file")
    return DataSource(folder.name, tuple(train), tuple(val), text_field, skip_bad)


def resolve_source(spec: str, text_field: str = "text", skip_bad: bool = False) -> DataSource:
    """`offline` (the bundled Wikipedia summaries, built on first use), `fineweb` (downloaded
    shards under NANOCHAT_HOME/data/fineweb-edu), or a path to a folder of files."""
    if spec == "offline":
        return folder_source(build_offline_corpus(), "text", skip_bad)
    if spec == "fineweb":
        folder = home() / "data" / "fineweb-edu"
        if not folder.is_dir() or len(_data_files(folder)) < 2:
            raise DataError(f"no FineWeb-Edu shards in {folder}; fetch some with `nanochat data download -n 8` "
                            "(or use --data offline)")
        return folder_source(folder, text_field, skip_bad)
    return folder_source(spec, text_field, skip_bad)
