"""tests/faults/sitecustomize.py patches hftk functions by name, and Python swallows any error a
sitecustomize raises: after a rename the faults would quietly stop firing. Each kind, armed here in
this process, must wrap the very name the loop calls and fire on the N-th call."""

from __future__ import annotations

import ast
import importlib.util
import signal
from pathlib import Path

import pytest

from tests.conftest import FAULTS


def arm(monkeypatch, spec: str) -> list[int]:
    """Imports a fresh copy of the fault module with HFTK_FAULT=spec; returns the signals it sent."""
    import os

    sent: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setenv("HFTK_FAULT", spec)
    monkeypatch.setenv("_", "/usr/bin/python")  # not the accelerate launcher, which the module skips
    module_spec = importlib.util.spec_from_file_location("fault_under_test", Path(FAULTS) / "sitecustomize.py")
    module_spec.loader.exec_module(importlib.util.module_from_spec(module_spec))
    return sent


def calls_in(function: str, source: Path) -> set[str]:
    tree = ast.parse(source.read_text())
    body = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
    return {node.func.id for node in ast.walk(body) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


@pytest.mark.parametrize(("kind", "name"), [("step", "train_window"), ("micro", "token_loss_sums")])
def test_loop_faults_fire_on_the_nth_call_of_what_the_loop_calls(kind, name, monkeypatch):
    from hftk.train import loop

    monkeypatch.setattr(loop, name, lambda *args, **kwargs: "called")
    sent = arm(monkeypatch, f"{kind}:2")
    assert getattr(loop, name)() == "called" and sent == []
    assert getattr(loop, name)() == "called" and sent == [signal.SIGKILL]
    # The loop calls these through its module globals, so the wrapped name is the one that runs.
    assert "_train_steps" in calls_in("train", Path(loop.__file__))
    assert "train_window" in calls_in("_train_steps", Path(loop.__file__))
    assert "token_loss_sums" in calls_in("train_window", Path(loop.__file__))


def test_save_fault_wraps_accelerates_save_state(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "save_state", lambda self, *args: "saved")
    sent = arm(monkeypatch, "save:1")
    assert Accelerator.save_state(object()) == "saved" and sent == [signal.SIGKILL]


def test_pace_fault_sleeps_after_every_step(monkeypatch):
    import time

    from hftk.train import loop

    slept: list[float] = []
    monkeypatch.setattr(loop, "train_window", lambda *args: "stepped")
    monkeypatch.setattr(time, "sleep", slept.append)
    assert arm(monkeypatch, "pace:250") == []
    assert [loop.train_window(), loop.train_window()] == ["stepped", "stepped"] and slept == [0.25, 0.25]


def test_rank_filter_leaves_other_ranks_alone(monkeypatch):
    from hftk.train import loop

    monkeypatch.setattr(loop, "train_window", lambda *args: "stepped")
    monkeypatch.setenv("RANK", "0")
    sent = arm(monkeypatch, "step:1:1")
    assert loop.train_window() == "stepped" and sent == []


def test_kill_faults_fire_in_a_launchs_first_attempt_only(monkeypatch):
    from hftk.train import loop

    monkeypatch.setattr(loop, "train_window", lambda *args, **kwargs: "called")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    sent = arm(monkeypatch, "step:1,freeze:1")
    assert loop.train_window() == "called" and sent == []


def test_freeze_fault_stops_the_process_after_the_nth_step(monkeypatch):
    from hftk.train import loop

    monkeypatch.setattr(loop, "train_window", lambda *args, **kwargs: "called")
    sent = arm(monkeypatch, "freeze:2")
    loop.train_window()
    assert sent == []
    loop.train_window()
    assert sent == [signal.SIGSTOP]


def test_spike_fault_is_keyed_by_the_examples_of_its_step(monkeypatch, tmp_path):
    import torch

    from hftk.train import loop

    def window(*rows):
        return [{"input_ids": torch.tensor([[*r, 0] for r in rows]), "attention_mask": torch.tensor([[1, 1, 0]] * len(rows))}]

    monkeypatch.setattr(loop, "train_window", lambda parts, batches, *args: torch.tensor(1.0))
    monkeypatch.setenv("HFTK_FAULT_KEYS", str(tmp_path / "keys.json"))
    arm(monkeypatch, "spike:2")
    assert loop.train_window(None, window([1, 2])).item() == 1.0
    assert loop.train_window(None, window([3, 4], [5, 6])).item() == 1000.0  # the 2nd step: its rows remembered
    assert loop.train_window(None, window([7, 8])).item() == 1.0
    assert loop.train_window(None, window([9, 9], [5, 6])).item() == 1000.0  # one of them again
    # A later process with the same file: the rows spike wherever they come, the 2nd step no longer counts.
    monkeypatch.setattr(loop, "train_window", lambda parts, batches, *args: torch.tensor(1.0))
    arm(monkeypatch, "spike:2")
    assert loop.train_window(None, window([1, 2])).item() == 1.0
    assert loop.train_window(None, window([7, 8])).item() == 1.0
    assert loop.train_window(None, window([3, 4])).item() == 1000.0


def test_spikes_fault_spikes_every_step_from_the_nth(monkeypatch):
    import torch

    from hftk.train import loop

    monkeypatch.setattr(loop, "train_window", lambda *args, **kwargs: torch.tensor(2.0))
    arm(monkeypatch, "spikes:2")
    assert [loop.train_window(None, []).item() for _ in range(3)] == [2.0, 2000.0, 2000.0]
