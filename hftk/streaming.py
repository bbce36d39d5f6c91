"""data.streaming: the training rows read as a stream (datasets' IterableDataset), never loaded or
tokenized whole.

- Checked up front: the first data.stream_check_rows rows, by the usual rules (exit 2 before any model
  loads). A bad row met later is skipped, counted (train_bad_rows_skipped) and logged.
- Read in order, not shuffled: a shuffle buffer's contents are not part of datasets' saved state, and
  an order that is a pure function of the file is what makes a resume exact.
- Several processes read disjoint rows: data-parallel rank r of W takes the rows whose index in the
  stream is r modulo W (a single file is one shard, so the split is by row, not by file).
- A process reads its rows in chunks of CHUNK_ROWS, checks them, tokenizes each chunk as one batch
  (text_generation's blocks stay inside a chunk) and batches the features in order. Its position (the
  chunk it is in, the features of that chunk already drawn, how often the stream was read through)
  is saved in every checkpoint; a resume skips the rows before that chunk unread by the tokenizer
  and continues from the next feature: the batches an unbroken run would have drawn.
- The stream ends before train.max_steps: it is read again from the start (logged).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets

from hftk import data as data_module
from hftk.errors import UserError
from hftk.logs import log
from hftk.recipe import DataSection, DataSource
from hftk.tasks.base import Task

CHUNK_ROWS = 256  # rows of one process checked and tokenized together


def open_stream(source: DataSource, key: str, where: str) -> datasets.IterableDataset:
    """The source as an IterableDataset: a local file through its builder, or a Hub dataset."""
    if data_module.is_local(source):
        path = Path(source.path)
        if not path.is_file():
            raise UserError(f"{where}: file not found: {path}")
        suffix = [s for s in path.suffixes if s != ".gz"][-1:] or [""]
        builder = data_module.FILE_BUILDERS.get(suffix[0])
        if builder is None:
            raise UserError(f"{where}: {path} is not a .json, .jsonl, .csv or .parquet file")
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split or key, revision=source.revision,
                                     streaming=True)
    except Exception as err:  # noqa: BLE001 - offline, auth, missing repo: all mean "cannot load"
        raise UserError(f"{where}: cannot stream dataset '{source.path}': {data_module._reason(err)}") from None


def head(source: DataSource, key: str, count: int, where: str) -> datasets.Dataset:
    """The first `count` rows, as a small in-memory dataset that the usual checks judge."""
    stream = open_stream(source, key, where)
    try:
        with data_module._quiet_builder_log():
            rows = list(itertools.islice(iter(stream), count))
    except Exception as err:  # noqa: BLE001 - the builders raise many types for a malformed file
        raise UserError(f"{where}: cannot read {source.path}: {data_module._reason(err)}") from None
    if not rows:
        raise UserError(f"{where}: {source.path} holds no rows")
    return datasets.Dataset.from_list(rows)


@dataclass
class Position:
    """Where one process is in its share of the stream."""

    passes: int = 0  # times the stream was read through
    chunk: int = 0  # the chunk being drawn from (counted in this process's rows / CHUNK_ROWS)
    used: int = 0  # features of that chunk already drawn
    drawn: int = 0  # features drawn in all
    bad_rows: int = 0  # rows skipped as bad in all
    counted_chunks: int = 0  # chunks of this pass whose bad rows are counted (a resumed chunk is not counted twice)


class Positions:
    """Every process's Position in one checkpoint object (Accelerate saves custom objects from the main
    process only): state_dict gathers them, load_state_dict keeps this process's."""

    def __init__(self, rank: int):
        self.rank = rank
        self.mine = Position()

    def state_dict(self) -> dict:
        from accelerate.utils import gather_object

        return {"positions": gather_object([asdict(self.mine)])}

    def load_state_dict(self, state: dict) -> None:
        self.mine = Position(**state["positions"][self.rank])


class StreamLoader:
    """The training loader of a stream: this process's batches, on its device, in order. Not a
    DataLoader, so Accelerate's prepare() passes it through unsplit (it is split already), and it keeps
    its own position (the loop does not skip batches for it on a resume)."""

    keeps_position = True

    def __init__(self, rows: Callable[[], datasets.IterableDataset], task: Task, tokenizer: Any, data: DataSection,
                 family: str, collator: Any, batch_size: int, micro_batches: int, rank: int, world: int,
                 device: Any, where: str):
        self.rows, self.task, self.tokenizer, self.data, self.family = rows, task, tokenizer, data, family
        self.collator, self.batch_size, self.micro_batches = collator, batch_size, micro_batches
        self.rank, self.world, self.device, self.where = rank, world, device, where
        self.position = Positions(rank)

    def __len__(self) -> int:
        return self.micro_batches  # the whole run is one epoch of the loop

    def set_epoch(self, epoch: int) -> None:
        pass  # read in order

    def examples_drawn(self) -> int:
        """Features drawn by every process together."""
        from accelerate.utils import gather_object

        return int(sum(gather_object([self.position.mine.drawn])))

    def bad_rows_skipped(self) -> int:
        from accelerate.utils import gather_object

        return int(sum(gather_object([self.position.mine.bad_rows])))

    def __iter__(self) -> Iterator[dict]:
        batch: list[dict] = []
        for feature in self._features():
            batch.append(feature)
            if len(batch) == self.batch_size:
                yield self._on_device(self.collator(batch))
                batch = []

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def _features(self) -> Iterator[dict]:
        position = self.position.mine
        while True:
            found_any, started = False, position.chunk
            for number, chunk in self._chunks(position.chunk):
                features = self._encode(chunk, count_bad=number >= position.counted_chunks)
                position.counted_chunks = max(position.counted_chunks, number + 1)
                found_any = found_any or bool(features)
                names = list(features)
                size = len(features[names[0]]) if names else 0
                while position.used < size:
                    feature = {name: features[name][position.used] for name in names}
                    position.used += 1
                    position.drawn += 1
                    yield feature
                position.chunk, position.used = number + 1, 0
            if not found_any and started == 0:
                raise UserError(f"{self.where}: no row of this process's share of the stream can be used")
            position.passes += 1
            position.chunk = position.used = position.counted_chunks = 0
            log.info(f"{self.where}: the stream ended; reading it again from the start (pass {position.passes + 1})")

    def _chunks(self, first: int) -> Iterator[tuple[int, dict[str, list]]]:
        """(number, rows) of this process's chunks from `first` on; the rows before it are read, not kept."""
        mine = itertools.islice(iter(self.rows()), self.rank, None, self.world)
        mine = itertools.islice(mine, first * CHUNK_ROWS, None)
        for number in itertools.count(first):
            rows = list(itertools.islice(mine, CHUNK_ROWS))
            if not rows:
                return
            yield number, {name: [row.get(name) for row in rows] for name in rows[0]}

    def _encode(self, chunk: dict[str, list], count_bad: bool) -> dict[str, list]:
        """The chunk's good rows tokenized; its bad rows skipped (counted and logged once)."""
        columns = self.task.columns(self.data)
        missing = [c for c in columns if c not in chunk]
        for column in missing:
            chunk[column] = [None] * len(next(iter(chunk.values())))
        problems = self.task.row_problems(chunk, self.data)
        sources = self.task.has_source(chunk, self.data)
        keep = [i for i, (problem, has) in enumerate(zip(problems, sources)) if problem is None and has]
        bad = len(problems) - len(keep)
        if bad and count_bad:
            self.position.mine.bad_rows += bad
            first = next(p for p in problems if p is not None) if any(problems) else "no source text"
            log.warning(f"{self.where}: skipped {bad} bad row(s) of the stream ({first})")
        if not keep:
            return {}
        good = {name: [values[i] for i in keep] for name, values in chunk.items()}
        return self.task.preprocess(good, self.tokenizer, self.data, self.family, True)


def stream_rows(source: DataSource, key: str, where: str, limit: int | None) -> Callable[[], Any]:
    """A fresh stream of the source each call (a pass), cut to data.max_train_samples rows."""
    def rows():
        stream = open_stream(source, key, where)
        return stream.take(limit) if limit else stream

    return rows
