"""Read behavior logs from files: the Taobao UserBehavior CSV, MovieLens (``u.data``, or the
``ratings.csv`` of ml-latest), or CSV/JSONL with a header.

Rows come out as raw dicts (plus the original line) for :func:`connectors.schema.validate`,
so a broken row reaches the DLQ with its reason instead of stopping a replay.

>>> import io
>>> rows = list(read_rows(io.StringIO("1,2,3,pv,1511658000\\n"), "taobao"))
>>> rows[0][0]
{'user_id': '1', 'item_id': '2', 'category_id': '3', 'behavior': 'pv', 'timestamp': '1511658000'}
>>> [r for r, _ in read_rows(io.StringIO("userId,movieId,rating,timestamp\\n1,31,2.5,1260759144\\n"), "movielens")]
[{'user_id': '1', 'item_id': '31', 'rating': '2.5', 'timestamp': '1260759144', 'behavior': 'view'}]
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
MOVIELENS_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
MOVIELENS_HEADER = "userid,movieid,rating,timestamp"  # ml-latest's ratings.csv
FORMATS = ("auto", "taobao", "movielens", "csv", "jsonl")


class LogFormatError(ValueError):
    pass


def detect_format(path: Path) -> str:
    """JSONL if the first line is an object; CSV with a header if it names user_id; MovieLens if
    it is four tab-separated numbers; else Taobao."""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if not first:
        raise LogFormatError(f"{path} is empty")
    if first.startswith("{"):
        return "jsonl"
    tabbed = first.split("\t")
    if (len(tabbed) == 4 and all(c.strip().isdigit() for c in tabbed)) or first.lower() == MOVIELENS_HEADER:
        return "movielens"
    header = [c.strip().lower() for c in first.split(",")]
    if "user_id" in header:
        return "csv"
    if len(header) == 5:
        return "taobao"
    raise LogFormatError(f"{path}: cannot tell the format from the first line {first[:80]!r}; give --format "
                         "taobao (user_id,item_id,category_id,behavior,timestamp without header), csv (with a "
                         "header naming user_id,item_id,behavior,ts or timestamp), movielens (user, item, rating, "
                         "timestamp; tab-separated, or ml-latest's ratings.csv) or jsonl")


def read_rows(f: IO[str], fmt: str) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """Yield ``(row, original line)``; row is None when the line cannot be split into fields."""
    if fmt == "jsonl":
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield None, line.rstrip("\n")
                continue
            yield (obj if isinstance(obj, dict) else None), line.rstrip("\n")
        return
    if fmt == "movielens":  # every rating is an interaction: the item was watched
        for n, line in enumerate(f):
            if not line.strip() or (n == 0 and line.strip().lower() == MOVIELENS_HEADER):
                continue
            fields = line.rstrip("\r\n").split("\t" if "\t" in line else ",")
            if len(fields) != len(MOVIELENS_COLUMNS):
                yield None, line.rstrip("\n")
                continue
            yield dict(zip(MOVIELENS_COLUMNS, fields, strict=True)) | {"behavior": "view"}, line.rstrip("\n")
        return
    reader = csv.reader(f)
    columns: tuple[str, ...] = TAOBAO_COLUMNS
    if fmt == "csv":
        header = next(reader, None)
        if header is None:
            return
        columns = tuple(c.strip().lower() for c in header)
    for fields in reader:
        if not fields:
            continue
        line = ",".join(fields)
        if len(fields) != len(columns):
            yield None, line
            continue
        yield dict(zip(columns, fields, strict=True)), line


def open_log(path: Path, fmt: str = "auto") -> Iterator[tuple[dict[str, Any] | None, str]]:
    if not path.exists():
        raise LogFormatError(f"{path} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise LogFormatError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        yield from read_rows(f, fmt)
