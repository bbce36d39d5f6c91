"""A split made of several sources: each read and checked under its own column keys, mapped to the
recipe's columns, labelled, and concatenated (row i of the split belongs to the source whose range holds i).

A split of one source is that source as data.py reads it, untouched, so every single-source recipe and
its caches stay as they were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import datasets

from hftk import data as data_module
from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import DataSection, DataSource
from hftk.tasks.base import Task


@dataclass
class Part:
    label: str
    weight: float | None
    rows: datasets.Dataset  # in the recipe's columns


@dataclass
class Split:
    """One split's sources and their rows, concatenated in the order the recipe lists them."""

    parts: list[Part]
    rows: datasets.Dataset
    feature_sizes: list[int] = field(default_factory=list)  # tokenized features per part, once tokenized
    stream: Any = None  # data.streaming: (source, its own column keys, where) of the stream; rows is its head

    @property
    def several(self) -> bool:
        return len(self.parts) > 1

    @property
    def weighted(self) -> bool:
        return self.several and all(part.weight is not None for part in self.parts)

    def row_ranges(self) -> list[tuple[str, int, int]]:
        """(label, first row, end row) of each part in `rows`."""
        ranges, start = [], 0
        for part in self.parts:
            ranges.append((part.label, start, start + len(part.rows)))
            start += len(part.rows)
        return ranges


def metric_label(label: str) -> str:
    """A label as it goes into a metric name (eval_<label>_<metric>): word characters only."""
    return re.sub(r"\W+", "_", label).strip("_") or "source"


def own_columns(data: DataSection, source: DataSource) -> DataSection:
    """`data` as this source names its columns."""
    return data.model_copy(update=source.columns()) if source.columns() else data


def where_of(key: str, index: int, source: DataSource, several: bool) -> str:
    return f"data.{key}.{index} ('{source.default_label()}')" if several else f"data.{key}"


def load_split_sources(task: Task, data: DataSection, key: str) -> Split | None:
    sources = data.sources(key)
    if not sources:
        return None
    several = len(sources) > 1
    if data.streaming and key == "train":
        return _stream_head(task, data, sources[0], key)
    parts = []
    for index, source in enumerate(sources):
        where = where_of(key, index, source, several)
        own = own_columns(data, source)
        rows = data_module.load_source(task, own, source, key, where)
        if several or own is not data:
            rows = _with_id(task.to_recipe_columns(rows, own, data, where), rows, own, data)
        parts.append(Part(source.default_label(), source.weight, rows))
    rows = _concatenated([part.rows for part in parts], data.id_column or "id", f"data.{key}") if several \
        else parts[0].rows
    return Split(parts, rows)


def _stream_head(task: Task, data: DataSection, source: DataSource, key: str) -> Split:
    """A stream is judged by its first data.stream_check_rows rows, by the usual rules; training reads the
    rest under the source's own column keys (hftk.streaming)."""
    from hftk import streaming

    where, own = f"data.{key}", own_columns(data, source)
    rows = streaming.head(source, key, data.stream_check_rows, where)
    rows = task.repair(data_module.check_split(rows, task, own, key, where), own, where)
    log.info(f"{where}: streaming; judged the first {len(rows)} rows, later bad rows are skipped and counted")
    if own is not data:  # the plan (a scratch tokenizer, token lengths) reads the head in the recipe's columns
        rows = task.to_recipe_columns(rows, own, data, where)
    return Split([Part(source.default_label(), None, rows)], rows, stream=(source, own, where))


def load_checked(task: Task, data: DataSection, keys: list[str]) -> dict[str, Split]:
    with data_module.quiet_datasets():
        return {key: split for key in keys if (split := load_split_sources(task, data, key)) is not None}


def _with_id(mapped: datasets.Dataset, rows: datasets.Dataset, own: DataSection,
             data: DataSection) -> datasets.Dataset:
    """Each row's id (predictions.jsonl names rows by it) comes along under the recipe's id column."""
    mine, theirs = own.id_column or "id", data.id_column or "id"
    if mine not in rows.column_names or theirs in mapped.column_names or len(mapped) != len(rows):
        return mapped
    ids = rows.select_columns([mine])
    return datasets.concatenate_datasets([mapped, ids.rename_column(mine, theirs) if mine != theirs else ids], axis=1)


def _concatenated(parts: list[datasets.Dataset], id_column: str, where: str) -> datasets.Dataset:
    """The parts one after another, in the first part's column types; a column not every part has, or an
    id column whose type differs between parts, is left out (rows are then named by their number)."""
    shared = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    if id_column in shared and len({str(p.features[id_column]) for p in parts}) > 1:
        shared.remove(id_column)
    parts = [p.select_columns(shared) if p.column_names != shared else p for p in parts]
    features = parts[0].features
    try:
        parts = [parts[0], *(p if p.features == features else p.cast(features) for p in parts[1:])]
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: the sources' columns hold different types ({data_module._reason(err)}); "
                        f"give every source the same kind of values") from None
    return datasets.concatenate_datasets(parts)


def split_digest(split: Split, key: str, data: DataSection, file_digest: Any) -> str:
    """What a split's rows are, for the resume checks: one source's file digest as before; for several,
    a digest of each source's label, weight, column keys and file digest together."""
    import hashlib
    import json

    sources = data.sources(key)
    if len(sources) == 1:
        return file_digest(sources[0], split.rows)
    described = [[source.default_label(), source.weight, source.columns(), file_digest(source, part.rows)]
                 for source, part in zip(sources, split.parts)]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
