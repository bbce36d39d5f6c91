"""Telling a diverging step from learning: a non-finite loss, or (train.spike_factor) a step loss far
above the running median of the steps before it.

Each optimizer step's loss share stays on the device; the shares are summed over processes and judged
only at logging and save steps, so the hot path never waits on the host, and a checkpoint is written
only after every step it holds was judged good.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

HISTORY = 32  # steps the running median looks back over
MIN_HISTORY = 4  # steps needed before a spike can be told from the first steps' fast descent


class Diverged(Exception):
    """The first bad optimizer step since the last judgement, and where its micro-batches began
    (`position`: micro-batches of this process already consumed in `epoch`)."""

    def __init__(self, step: int, epoch: int, position: int, reason: str):
        super().__init__(reason)
        self.step, self.epoch, self.position, self.reason = step, epoch, position, reason


class DivergenceWatch:
    def __init__(self, spike_factor: float | None, history: list[float]):
        self.spike_factor = spike_factor
        self.history = history  # TrainState.recent_losses: checkpointed, so a resume judges alike
        self._steps: list[tuple[int, int, int]] = []
        self._shares: list[torch.Tensor] = []

    def record(self, share: torch.Tensor, step: int, epoch: int, position: int) -> None:
        self._steps.append((step, epoch, position))
        self._shares.append(share.detach().reshape(()))

    def judge(self, accelerator: Any) -> None:
        """Every process reaches this at the same step; raises Diverged on all of them alike."""
        if not self._shares:
            return
        losses = accelerator.reduce(torch.stack(self._shares).float(), reduction="sum").tolist()
        steps, self._steps, self._shares = self._steps, [], []
        for (step, epoch, position), loss in zip(steps, losses):
            reason = self._verdict(loss)
            if reason is not None:
                raise Diverged(step, epoch, position, reason)
            self.history.append(loss)
            del self.history[:-HISTORY]

    def forget(self) -> None:
        """After a rollback: the steps recorded since the checkpoint are gone with it."""
        self._steps, self._shares = [], []

    def _verdict(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return "the training loss became non-finite"
        if self.spike_factor is not None and len(self.history) >= MIN_HISTORY:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                return (f"the training loss {loss:.4g} exceeds train.spike_factor={self.spike_factor:g} x the median "
                        f"{median:.4g} of the last {len(self.history)} steps")
        return None
