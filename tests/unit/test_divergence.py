"""Telling a diverging step from learning (train.on_divergence, train.spike_factor), and the commands a
finetune hands back (hftk.followups)."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
import torch

from hftk.train.divergence import HISTORY, MIN_HISTORY, Diverged, DivergenceWatch


class OneProcess:
    def reduce(self, tensor, reduction="sum"):
        return tensor


def judged(losses: list[float], spike_factor: float | None = 3.0, history: list[float] | None = None):
    watch = DivergenceWatch(spike_factor, [] if history is None else history)
    for step, loss in enumerate(losses, start=1):
        watch.record(torch.tensor(loss), step, epoch=0, position=2 * (step - 1))
    watch.judge(OneProcess())
    return watch


def test_a_falling_loss_is_learning():
    watch = judged([9.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.9])
    assert watch.history == pytest.approx([9.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.9])


def test_a_step_above_the_factor_times_the_running_median_is_a_spike():
    with pytest.raises(Diverged) as caught:
        judged([6.0, 5.0, 5.0, 4.0, 4.0, 16.0, 4.0])
    bad = caught.value
    assert (bad.step, bad.epoch, bad.position) == (6, 0, 10)  # where its micro-batches began
    assert "spike_factor=3" in bad.reason and "median 5" in bad.reason


def test_no_spike_before_enough_history_and_none_without_a_factor():
    judged([6.0] * (MIN_HISTORY - 1) + [100.0])
    judged([6.0, 5.0, 5.0, 4.0, 4.0, 16.0], spike_factor=None)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_a_divergence_with_or_without_a_factor(bad):
    with pytest.raises(Diverged, match="non-finite") as caught:
        judged([6.0, bad, 5.0], spike_factor=None)
    assert caught.value.step == 2


def test_the_history_is_bounded_and_carried_in_place():
    kept: list[float] = []
    judged([float(i) for i in range(1, 100)], spike_factor=None, history=kept)
    assert kept == [float(i) for i in range(100 - HISTORY, 100)]  # TrainState's own list, so it is checkpointed


def test_the_continue_command_repeats_the_overrides_shell_quoted(monkeypatch):
    from hftk import followups

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = followups.continue_command(Path("my recipe.yaml"), ["train.output_dir=/tmp/a b", "train.max_steps=9",
                                                               "train.overwrite_output_dir=true"])
    words = shlex.split(line.split("to continue, run: ", 1)[1])
    assert words == ["hftk", "finetune", "my recipe.yaml", "train.output_dir=/tmp/a b", "train.max_steps=9",
                     "train.resume_from_checkpoint=latest"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert followups.continue_command(Path("r.yaml"), []).startswith("rerun the same launcher line with: -m hftk finetune")
