"""The progress bar of a training run: main process only, on a terminal only, never with --quiet.

Advancing it costs no device work; the loss, learning rate and throughput it shows are those of the
last metrics row, so the hot loop never waits on the host for the bar.
"""

from __future__ import annotations

from typing import Any

from hftk.tracking import progress_console


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
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, epoch="-", loss="-",
                                           lr="-", speed="-")
        self.progress.start()

    def advance(self, step: int, epoch: float) -> None:
        self.progress.update(self.task, completed=step, epoch=f"{epoch:.2f}")

    def show(self, row: dict[str, Any]) -> None:
        self.progress.update(self.task, loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                             speed=f"{row['tokens_per_second']:,.0f}")

    def close(self) -> None:
        self.progress.stop()


def start_progress(is_main_process: bool, total_steps: int, start_step: int) -> NoProgress:
    console = progress_console() if is_main_process else None
    return TrainProgress(console, total_steps, start_step) if console is not None else NoProgress()
