"""Feature rows as the offline store's Parquet files: offline/<view>/date=YYYY-MM-DD/<name>.parquet.

No Feast import here: the backfill's Flink operators write through this module, and Feast
pulls in torch, whose import hangs inside Flink's embedded Python (measured: the task never
opens). connectors/offline_store.py derives each view's join keys and Arrow schema from Feast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.dsl import expand, key_parts


def records(row: dict[str, Any], keys: Mapping[str, Sequence[str]]) -> list[tuple[str, str, dict[str, Any]]]:
    """A feature-log row as ``(view, date, Parquet record)``; a catalogue row gives one per
    definition. ``keys`` names each view's join keys; views not in it (the trending list,
    definitions since removed) give none."""
    when = datetime.fromtimestamp(row["ts"] / 1000, tz=UTC)
    day = when.strftime("%Y-%m-%d")
    out = []
    for name, values in expand(row["view"], row["values"]):
        names = keys.get(name)
        if names is None:
            continue
        ids = dict(zip(names, key_parts(row["entity"], len(names)), strict=True))
        out.append((name, day, {**ids, "event_timestamp": when, **values}))
    return out


def write_part(root: Path, view: str, day: str, name: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    write_table(root, view, day, name, pa.Table.from_pylist(rows, schema=schema))


def write_table(root: Path, view: str, day: str, name: str, table: pa.Table) -> None:
    """One Parquet file of a view's day, written whole: readers never see half a file."""
    folder = root / view / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.rename(folder / f"{name}.parquet")


def conform(root: Path, view: str, schema: pa.Schema) -> int:
    """Rewrite the view's files written under an older schema (e.g. counts that became floats)
    in the one declared now, so a reader over the whole folder meets one schema; returns how
    many files it rewrote. A file that cannot be cast stays as it is, and the error says which."""
    rewritten = 0
    for path in sorted((root / view).glob("date=*/*.parquet")):
        if pq.read_schema(path).remove_metadata().equals(schema):
            continue
        try:
            table = pq.read_table(path, partitioning=None).select(schema.names).cast(schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            was = ", ".join(f"{f.name}: {f.type}" for f in pq.read_schema(path))
            raise ValueError(f"{path}: written as ({was}), cannot be read in the view's schema now ({exc}); "
                             "move the file away or convert it") from None
        write_table(root, view, path.parent.name.removeprefix("date="), path.stem, table)
        rewritten += 1
    return rewritten
