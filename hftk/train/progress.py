"""Progress bars of a run, training and evaluation: main process only, on a terminal only, never
with --quiet.

Advancing it costs no device work; the loss, learning rate and throughput it shows are those of the
last metrics row, so the hot loop never waits on the host for the bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from hftk.logs import progress_console

_live: TrainProgress | None = None  # rich draws one live display at a time: evaluation joins this one


class NoProgress:
    def advance(self, step: int, epoch: float) -> None:
        pass

    def show(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TrainProgress(NoProgress):
    def __init__(self, console: Any, total_steps: int, start_step: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, epoch="-", loss="-",
                                           lr="-", speed="-")
        self.progress.start()
        global _live
        _live = self

    def advance(self, step: int, epoch: float) -> None:
        self.progress.update(self.task, completed=step, epoch=f"{epoch:.2f}")

    def show(self, row: dict[str, Any]) -> None:
        self.progress.update(self.task, loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                             speed=f"{row['tokens_per_second']:,.0f}")

    def close(self) -> None:
        global _live
        _live = None
        self.progress.stop()


def start_progress(is_main_process: bool, total_steps: int, start_step: int) -> NoProgress:
    console = progress_console() if is_main_process else None
    return TrainProgress(console, total_steps, start_step) if console is not None else NoProgress()


@contextlib.contextmanager
def evaluation_progress(is_main_process: bool, total_batches: int, label: str = "eval") -> Iterator[Callable[[], None]]:
    """Yields a function to call after each evaluation batch: a bar of its own on the main process's
    terminal (a row under the training bar while training runs), nothing elsewhere."""
    if not is_main_process:
        yield lambda: None
        return
    if _live is not None:
        progress = _live.progress
        task = progress.add_task(label, total=total_batches, epoch="-", loss="-", lr="-", speed="-")
        try:
            yield lambda: progress.advance(task)
        finally:
            progress.remove_task(task)
        return
    console = progress_console()
    if console is None:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(label, total=total_batches)
        yield lambda: progress.advance(task)
