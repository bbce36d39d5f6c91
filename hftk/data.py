"""Raw splits (local files or the Hub) through `datasets`, checked, tokenized with a cached map."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import DataSection, DataSource
from hftk.tasks.base import EXAMPLE_INDEX, Task, column_key
from hftk.tasks.squad_schema import flatten_nested_squad, is_nested_squad

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What the row check writes for each row.
PROBLEM, HAS_SOURCE = "problem", "has_source"
VERDICT_FEATURES = datasets.Features({PROBLEM: datasets.Value("string"), HAS_SOURCE: datasets.Value("bool")})


def is_local(source: DataSource) -> bool:
    path = Path(source.path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return path.exists() or bool(suffixes and suffixes[-1] in FILE_BUILDERS)


def load_split(source: DataSource, key: str, where: str | None = None) -> datasets.Dataset:
    """`where` names the source in messages (data.train, or data.train.1 ('wiki') in a list)."""
    where = where or f"data.{key}"
    if is_local(source):
        dataset = _load_file(Path(source.path), where)
    else:
        dataset = _load_hub(source, where, key)
    if len(dataset) == 0:
        raise UserError(f"{where}: {source.path} holds no rows")
    return dataset


def _load_file(path: Path, where: str) -> datasets.Dataset:
    if not path.is_file():
        raise UserError(f"{where}: file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{where}: {path} is empty")
    suffix = [s for s in path.suffixes if s != ".gz"][-1:] or [""]
    builder = FILE_BUILDERS.get(suffix[0])
    if builder is None:
        raise UserError(f"{where}: {path} is not a .json, .jsonl, .csv or .parquet file")
    if is_nested_squad(path):
        return datasets.Dataset.from_list(flatten_nested_squad(path))
    try:
        with _quiet_builder_log():  # the builder logs the parser's detail on a line of its own
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - the builders raise many types for a malformed file
        raise UserError(f"{where}: cannot read {path}: {_reason(err)}") from None


def _load_hub(source: DataSource, where: str, key: str) -> datasets.Dataset:
    split = source.split or key  # data.validation reads the validation split by default
    try:
        return datasets.load_dataset(source.path, source.name, split=split, revision=source.revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"{where}: dataset '{source.path}' has no split '{split}': {_reason(err)}") from None
        raise UserError(f"{where}: cannot load dataset '{source.path}': {_reason(err)}") from None
    except Exception as err:  # noqa: BLE001 - offline, auth, missing repo: all mean "cannot load"
        raise UserError(
            f"{where}: '{source.path}' is not a local file and cannot be loaded from the Hugging Face Hub "
            f"({_reason(err)}); give a local .json/.jsonl/.csv/.parquet file"
        ) from None


def _reason(err: BaseException) -> str:
    """The innermost cause's first line (datasets wraps the parser's error in a generic one), with a CSV
    parser's detail as `line 7: expected 3 fields, saw 4`."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if fields:
        text = f"line {fields.group(2)}: expected {fields.group(1)} fields, saw {fields.group(3)}"
    return text[:300]


@contextlib.contextmanager
def _quiet_builder_log():
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_split(dataset: datasets.Dataset, task: Task, data: DataSection, key: str,
                where: str | None = None) -> datasets.Dataset:
    """Every row is checked: bad rows stop the run with their count and the first one, or, with
    data.drop_bad_rows, are dropped and counted. Returns the rows to use."""
    where = where or f"data.{key}"
    _check_columns(dataset, task, data, where)
    verdicts = row_verdicts(dataset, task, data)
    problems = verdicts.column(PROBLEM)
    if problems.null_count < len(problems):
        dataset = _without_bad_rows(dataset, problems, data, where)
    if not pc.any(pc.and_kleene(pc.is_null(problems), verdicts.column(HAS_SOURCE))).as_py():
        raise UserError(f"{where}: every {task.source_label(data)} is empty or blank ({len(dataset)} rows): "
                        f"there is no text to learn from")
    return dataset


def _check_columns(dataset: datasets.Dataset, task: Task, data: DataSection, where: str) -> None:
    missing = [c for c in task.columns(data) if c not in dataset.column_names]
    if missing:
        keys = [k for k in (column_key(data, m) for m in missing) if k]
        raise UserError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"(columns are: {', '.join(dataset.column_names)})"
            + (f"; set {' and '.join(keys)} to name your own" if keys else "")
        )


def row_verdicts(dataset: datasets.Dataset, task: Task, data: DataSection) -> pa.Table:
    return judge_rows(dataset, task, data).with_format("arrow")[:]


def judge_rows(dataset: datasets.Dataset, task: Task, data: DataSection) -> datasets.Dataset:
    """One row per raw row: its problem (null when good) and whether it has source text. A batched,
    cached map over the task's columns; the code fingerprint keeps a stale verdict from being reused."""
    columns = dataset.select_columns(task.columns(data))
    workers = data.preprocessing_num_workers
    return columns.map(
        _judge_rows,
        batched=True,
        remove_columns=columns.column_names,
        features=VERDICT_FEATURES,
        fn_kwargs={"task": task, "data": data, "code": preprocessing_code_fingerprint()},
        num_proc=min(workers, len(columns)) if workers else None,
        desc="checking rows",
    )


def _judge_rows(rows: dict[str, list[Any]], task: Task, data: DataSection, code: str) -> dict[str, list[Any]]:
    return {PROBLEM: task.row_problems(rows, data), HAS_SOURCE: task.has_source(rows, data)}


def _without_bad_rows(dataset: datasets.Dataset, problems: pa.ChunkedArray, data: DataSection,
                      where: str) -> datasets.Dataset:
    """Refuses the split unless data.drop_bad_rows lets the bad rows go and some good ones are left."""
    total = len(problems)
    bad = total - problems.null_count
    first = pc.index(pc.is_valid(problems), True).as_py()  # counted from 0, as dataset[i] counts
    first_problem = f"first at row {first}: {problems[first].as_py()}"
    if bad == total:
        leaves = " (data.drop_bad_rows would leave no row)" if data.drop_bad_rows else ""
        raise UserError(f"{where}: {bad} of {total} rows are bad; {first_problem}{leaves}")
    if not data.drop_bad_rows:
        raise UserError(f"{where}: {bad} of {total} rows are bad; {first_problem} "
                        f"(set data.drop_bad_rows=true to skip them)")
    log.info(f"{where}: dropped {bad} bad rows of {total} ({first_problem})")
    # as int64: datasets' fast path for a contiguous run of rows (bad rows only at the end) fails on uint64
    return dataset.select(pc.indices_nonzero(pc.is_null(problems)).to_numpy().astype("int64"))


def check_json_tail(dataset: datasets.Dataset, path: Path, columns: list[str], where: str) -> None:
    """datasets reads JSON lines in 10 MB chunks. When a later chunk mixes text with numbers, lists or
    objects in one column, it keeps that column's text as JSON (quotes included) from there to the end
    of the file, silently. The file's last row then differs from the last row loaded."""
    raw = _last_json_row(path)
    if raw is None:
        return
    loaded = dataset[len(dataset) - 1]
    for column in columns:
        value = raw.get(column)
        if column in loaded and isinstance(value, str | int | float | bool) and loaded[column] != value:
            raise UserError(
                f"{where}: column '{column}' holds text in some rows and numbers, lists or objects in others; "
                f"{path} is too large for datasets to load such a column row by row (it turns the values into "
                f"JSON text), so make every '{column}' a string"
            )


def _last_json_row(path: Path) -> dict[str, Any] | None:
    if path.suffix not in {".json", ".jsonl"} or is_nested_squad(path):
        return None
    line = _last_line(path)
    try:
        row = json.loads(line) if line else None
    except ValueError:  # a JSON array file, or a last line datasets could not have read either
        return None
    return row if isinstance(row, dict) else None


def _last_line(path: Path, limit: int = 16 << 20) -> bytes | None:
    """The last non-blank line; None when it is longer than `limit` (a JSON array on one line)."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        span = 1 << 16
        while True:
            start = max(size - span, 0)
            handle.seek(start)
            text = handle.read(size - start).rstrip()
            if b"\n" in text:
                return text.rsplit(b"\n", 1)[1]
            if start == 0:
                return text
            if span >= limit:
                return None
            span *= 4  # grows, so a long line is read in a few passes, not one per block


@contextlib.contextmanager
def quiet_datasets():
    """Loading happens while the inputs are checked: its progress bars would bury a one-line error."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_checked(task: Task, data: DataSection, keys: list[str]) -> dict[str, datasets.Dataset]:
    with quiet_datasets():
        return {key: split for key, split in _load_all(task, data, keys)}


def _load_all(task: Task, data: DataSection, keys: list[str]):
    for key in keys:
        for source in data.sources(key)[:1]:  # several sources: hftk.sources
            yield key, load_source(task, data, source, key)


def load_source(task: Task, data: DataSection, source: DataSource, key: str,
                where: str | None = None) -> datasets.Dataset:
    """One source read and checked by `data`'s rules (its columns, the task's row checks, repairs,
    max_*_samples); `where` names it in messages."""
    where = where or f"data.{key}"
    dataset = load_split(source, key, where)
    if is_local(source):
        check_json_tail(dataset, Path(source.path), task.columns(data), where)
    dataset = check_split(dataset, task, data, key, where)
    dataset = task.repair(dataset, data, where)  # real-world data mended (QA answer offsets)
    limit = data.max_train_samples if key == "train" else data.max_eval_samples
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


@functools.lru_cache(maxsize=1)
def preprocessing_code_fingerprint() -> str:
    """datasets hashes a task object by its class name, not its code: without this, a new hftk
    version would reuse rows tokenized by the old one."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([here / "data.py", *(here / "tasks").glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _encode(rows: dict[str, list[Any]], indices: list[int], task: Task, tokenizer: Any, data: DataSection,
            family: str, training: bool, code: str, offset: int = 0) -> dict[str, list[Any]]:
    features = task.preprocess(rows, tokenizer, data, family, training)
    if not training:
        # A task that splits rows into several features (QA windows) says which row each came from;
        # `offset` counts the rows of the sources before this one in a list of sources.
        relative = features.get(EXAMPLE_INDEX, range(len(indices)))
        features[EXAMPLE_INDEX] = [offset + indices[i] for i in relative]
    return features


def tokenize(dataset: datasets.Dataset, task: Task, tokenizer: Any, data: DataSection, family: str,
             training: bool, split: str | None = None, offset: int = 0) -> datasets.Dataset:
    """datasets caches the result under a fingerprint of the function and its arguments, so a change of
    tokenizer, lengths, columns or family makes a new cache entry instead of reusing a stale one.
    Quiet: a row that cannot be encoded is bad input, reported as one line."""
    with quiet_datasets():
        features = _map(dataset, task, tokenizer, data, family, training, offset)
    if len(features) == 0:
        raise UserError(_nothing_to_learn(split or ("train" if training else "validation"), len(dataset), data))
    return features


def _nothing_to_learn(split: str, rows: int, data: DataSection) -> str:
    """Only text_generation can get here: it keeps whole blocks of max_source_length tokens."""
    return (f"data.{split}: its {rows} rows tokenize to less than one block of data.max_source_length="
            f"{data.max_source_length} tokens; lower data.max_source_length or give more text")


def _map(dataset: datasets.Dataset, task: Task, tokenizer: Any, data: DataSection, family: str,
         training: bool, offset: int = 0) -> datasets.Dataset:
    arguments = {"task": task, "tokenizer": tokenizer, "data": data, "family": family, "training": training,
                 "code": preprocessing_code_fingerprint()}
    if offset:  # only then: a single source keeps the cache entries it had
        arguments["offset"] = offset
    return dataset.map(
        _encode,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs=arguments,
        num_proc=data.preprocessing_num_workers,
        desc="tokenizing",
    )
