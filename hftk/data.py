"""Raw splits (local files or the Hub) through `datasets`, checked, tokenized with a cached map."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any

import datasets

from hftk.errors import UserError
from hftk.recipe import DataSection, DataSource
from hftk.tasks.base import EXAMPLE_INDEX, Task
from hftk.tasks.squad_schema import flatten_nested_squad, is_nested_squad

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ROWS_CHECKED = 100


def is_local(source: DataSource) -> bool:
    path = Path(source.path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return path.exists() or bool(suffixes and suffixes[-1] in FILE_BUILDERS)


def load_split(source: DataSource, key: str) -> datasets.Dataset:
    where = f"data.{key}"
    if is_local(source):
        dataset = _load_file(Path(source.path), where)
    else:
        dataset = _load_hub(source, where)
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
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - the builders raise many types for a malformed file
        raise UserError(f"{where}: cannot read {path}: {_reason(err)}") from None


def _load_hub(source: DataSource, where: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"{where}: dataset '{source.path}' has no split '{source.split}': {_reason(err)}") from None
        raise UserError(f"{where}: cannot load dataset '{source.path}': {_reason(err)}") from None
    except Exception as err:  # noqa: BLE001 - offline, auth, missing repo: all mean "cannot load"
        raise UserError(
            f"{where}: '{source.path}' is not a local file and cannot be loaded from the Hugging Face Hub "
            f"({_reason(err)}); give a local .json/.jsonl/.csv/.parquet file"
        ) from None


def _reason(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def check_split(dataset: datasets.Dataset, task: Task, data: DataSection, key: str) -> None:
    where = f"data.{key}"
    missing = [c for c in task.columns(data) if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"(columns are: {', '.join(dataset.column_names)})"
        )
    task.check_rows(dataset[:ROWS_CHECKED], data, where)


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
        source = getattr(data, key)
        if source is None:
            continue
        dataset = load_split(source, key)
        check_split(dataset, task, data, key)
        if hasattr(task, "repair"):  # tasks whose real-world data needs mending (QA answer offsets)
            dataset = task.repair(dataset, data, f"data.{key}")
        limit = data.max_train_samples if key == "train" else data.max_eval_samples
        yield key, (dataset.select(range(min(limit, len(dataset)))) if limit else dataset)


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
            family: str, training: bool, code: str) -> dict[str, list[Any]]:
    features = task.preprocess(rows, tokenizer, data, family, training)
    if not training:
        # A task that splits rows into several features (QA windows) says which row each came from.
        relative = features.get(EXAMPLE_INDEX, range(len(indices)))
        features[EXAMPLE_INDEX] = [indices[i] for i in relative]
    return features


def tokenize(dataset: datasets.Dataset, task: Task, tokenizer: Any, data: DataSection, family: str,
             training: bool) -> datasets.Dataset:
    """datasets caches the result under a fingerprint of the function and its arguments, so a change of
    tokenizer, lengths, columns or family makes a new cache entry instead of reusing a stale one.
    Quiet: a row that cannot be encoded is bad input, reported as one line."""
    with quiet_datasets():
        return _map(dataset, task, tokenizer, data, family, training)


def _map(dataset: datasets.Dataset, task: Task, tokenizer: Any, data: DataSection, family: str,
         training: bool) -> datasets.Dataset:
    return dataset.map(
        _encode,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"task": task, "tokenizer": tokenizer, "data": data, "family": family, "training": training,
                   "code": preprocessing_code_fingerprint()},
        num_proc=data.preprocessing_num_workers,
        desc="tokenizing",
    )
